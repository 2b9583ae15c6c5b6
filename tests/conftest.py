import os

# Progress bars off and no analytics in every test process and tool it starts.
os.environ["UDQUANT_NO_PROGRESS"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
