"""Whole jobs built on the tasks: loading any run or model name (`hub.load`), converting and exporting weights, and
the demos. Above the tasks; only the web app and the command line import them."""
