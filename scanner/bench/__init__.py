"""``gate-scanner bench NAME``: each benchmark prints its figures as JSON, one module each.

Speed and memory goals are measured here, never asserted by timed tests.
"""
