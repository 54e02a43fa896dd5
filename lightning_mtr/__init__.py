"""lightning-mtr: multi-task recommendation ranking on TorchRec tables and Lightning."""

__version__ = "0.1.0"
