import os
import sys

# tests import their helpers (dist_utils) by module name, in spawned ranks too
sys.path.insert(0, os.path.dirname(__file__))
