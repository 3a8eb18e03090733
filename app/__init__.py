"""The `ditstudio` command line and the Gradio web UI. Thin: every command and UI callback calls the same
pipeline functions the tests call."""
