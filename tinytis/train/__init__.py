"""The training stages behind train.py: one module per stage, on the shared pieces in common.py."""
