"""What both sides of the stack agree on, without torch: the model parameters and card, the Triton
config every model shares, checkpoint locations, score templates and the gRPC headers.

The host side (``poolserve_stack``), the Triton stub (``poolserve_runtime``) and the HTTP adapter
(``poolserve_adapter``) all import from here; nothing here imports any of them.
"""
