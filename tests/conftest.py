import os
import sys

# tests import helpers such as comfy_host by plain name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# the workflow builder, for tests that lay out rewritten graphs
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows"))
