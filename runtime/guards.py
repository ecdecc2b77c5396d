"""What an engine pipeline cannot do, said at once: the diffusers methods that would move, cast,
offload or save PyTorch weights have no meaning for engines built for one device and precision."""
from __future__ import annotations

from runtime.errors import NotSupportedError
from runtime.lora_api import EngineLoras


class EngineBacked(EngineLoras):
    """Mixed into every family's pipeline classes (before the diffusers class)."""

    def _engine_device(self):
        return self.unet.device

    def to(self, *args, **kwargs):
        """A no-op for the engines' own device and float32; anything else is refused, naming the
        rebuild that gives it (engines are built for one device, and their precision is in the graph)."""
        import torch

        device = kwargs.get("device")
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device, int)):
                device = arg
        if isinstance(device, int):  # a CUDA device index
            device = torch.device("cuda", device)
        backend = self.manifest.backend
        if device is not None and torch.device(device).type != self._engine_device().type:
            raise NotSupportedError(
                f"these engines run on {self._engine_device().type} ({backend['name']}, "
                f"{backend.get('execution_provider') or backend.get('gpu', '')}) and cannot move to "
                f"{torch.device(device).type}: build an artifact for it (kiln build MODEL --backend tensorrt, or "
                "--backend onnxruntime --device cuda) and load that")
        if dtype is not None and dtype != torch.float32:
            precisions = sorted({c.precision for c in self.manifest.components.values()})
            raise NotSupportedError(
                f"the engines' precision is built into them ({', '.join(precisions)}; they take and return float32) "
                f"and cannot be cast to {dtype}: rebuild with kiln build MODEL --precision fp16 for fp16 engines")
        return self

    def save_pretrained(self, *args, **kwargs):
        raise NotSupportedError(
            "an engine pipeline holds no PyTorch weights to save: the artifact folder is what you ship "
            f"(copy {self.manifest.folder}), and kiln build MODEL makes another from the model's own folder")

    def enable_model_cpu_offload(self, *args, **kwargs):
        raise NotSupportedError("engines have no PyTorch modules to offload; for a small GPU, build TensorRT engines "
                                "with --weight-streaming and load them with weight_streaming_budget=...")

    enable_sequential_cpu_offload = enable_model_cpu_offload

    def enable_vae_slicing(self):
        """Decode (and encode) a batch one image at a time, as diffusers' VAE slicing does."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """Decode (and encode) in overlapping tiles blended as diffusers blends them: sizes above the VAE
        engines' range run while the UNet's profile covers them (runtime/vae_tiling.py)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()
