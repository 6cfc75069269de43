"""TransferCL: fine-tune pretrained networks with OpenCL kernels."""
__version__ = "0.1.0"
