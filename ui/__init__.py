"""The browser UI: Gradio chat and monitor tabs, mounted at / by appliance.cli (see ui/app.py)."""
