"""Dataset adapters, manifest validation, splits, audit and the torch dataset."""
