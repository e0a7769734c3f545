import os
import sys

# tests import the plain reference implementations as `import reference`
sys.path.insert(0, os.path.dirname(__file__))
