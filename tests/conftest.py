import os
import sys

# tests import helpers such as comfy_host by plain name
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
