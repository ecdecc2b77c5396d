"""diffusers' LoRA methods on an engine pipeline: load_lora_weights, set_adapters, disable_lora,
enable_lora, delete_adapters, unload_lora_weights, get_active_adapters, get_list_adapters.

They behave as diffusers' do (a newly loaded adapter becomes the only active one, at weight 1;
set_adapters takes a weight per adapter, or a {module: weight} dict), but the engines hold merged
weights: every change of the active set swaps them in refittable engines (runtime/refit.py), so a
call costs nothing extra. Artifacts built without --refit refit refuse these with what to do."""
from __future__ import annotations

from collections.abc import Mapping

from runtime.errors import NotSupportedError, RequestError
from runtime.refit import RefitSet

NOT_REFITTABLE = ("these engines were built without --refit refit, so their weights cannot change: rebuild with "
                  "kiln build MODEL --refit refit to load LoRAs at run time, or fuse one at build with --lora FILE")


class EngineLoras:
    """Mixed into every engine pipeline (through runtime.guards.EngineBacked)."""

    def _lora_state(self) -> dict:
        state = self.__dict__.get("_kiln_lora")
        if state is None:
            engines = self.__dict__.get("_kiln_engines") or {}
            refit = RefitSet(self.manifest, engines)
            if not refit.components:
                raise NotSupportedError(NOT_REFITTABLE)
            state = self.__dict__["_kiln_lora"] = {"refit": refit, "loras": {}, "active": [], "enabled": True}
        return state

    @property
    def lora_refit(self) -> RefitSet:
        """The refittable engines and their swap counters (swaps, swap_seconds)."""
        return self._lora_state()["refit"]

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict=None, adapter_name: str | None = None,
                          hotswap: bool = False, **kwargs):
        """Read a LoRA (file, folder, hub id or state dict; diffusers' and kohya's formats) and make
        it the active adapter at weight 1, as diffusers does."""
        from runtime.lora import read_lora

        state = self._lora_state()
        if pretrained_model_name_or_path_or_dict is None:
            raise RequestError("load_lora_weights needs a LoRA: a .safetensors file, a folder, a hub id or a state dict",
                               field="lora")
        loras = state["loras"]
        kwargs.pop("low_cpu_mem_usage", None)
        name = adapter_name or f"default_{len(loras)}"
        if name in loras and not hotswap:
            raise RequestError(f"adapter name {name!r} is already in use (loaded: {', '.join(loras)}); "
                               "choose another adapter_name, pass hotswap=True, or delete_adapters it first",
                               field="adapter_name")
        if hotswap and name not in loras:
            raise RequestError(f"hotswap=True replaces a loaded adapter, and {name!r} is not one "
                               f"(loaded: {', '.join(loras) or 'none'})", field="adapter_name")
        refit = state["refit"]
        modules = {m: set(refit.by_module[m].params) | refit.by_module[m].unused if m in refit.by_module else set()
                   for m in (getattr(self, "_lora_loadable_modules", None) or refit.modules)}
        lora = read_lora(type(self), pretrained_model_name_or_path_or_dict, name, modules, **kwargs)
        state["refit"].check(lora)
        loras[name] = lora
        if hotswap:  # same name, new weights: the active set stays, its merge is redone
            state["refit"].cache.clear()
            state["refit"].applied = None
        else:
            state["active"] = [(name, self._weights(1.0, name))]
        self._apply_loras()

    def set_adapters(self, adapter_names, adapter_weights=None):
        """Activate these adapters (a name or a list) at these weights (None: 1 each; a number or a
        {module: number} dict per adapter, or one for all)."""
        state = self._lora_state()
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in state["loras"]]
        if unknown:
            raise RequestError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: "
                               f"{', '.join(state['loras']) or 'none'} (load_lora_weights(..., adapter_name=...))",
                               field="adapter_names")
        if not isinstance(adapter_weights, (list, tuple)):
            adapter_weights = [adapter_weights] * len(names)
        if len(adapter_weights) != len(names):
            raise RequestError(f"{len(names)} adapters but {len(adapter_weights)} adapter_weights; give one each",
                               field="adapter_weights")
        state["active"] = [(n, self._weights(1.0 if w is None else w, n)) for n, w in zip(names, adapter_weights)]
        self._apply_loras()

    def disable_lora(self):
        self._lora_state()["enabled"] = False
        self._apply_loras()

    def enable_lora(self):
        self._lora_state()["enabled"] = True
        self._apply_loras()

    def delete_adapters(self, adapter_names):
        state = self._lora_state()
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for n in names:
            state["loras"].pop(n, None)
        state["active"] = [(n, w) for n, w in state["active"] if n not in names]
        state["refit"].cache.clear()
        self._apply_loras()

    def unload_lora_weights(self, *args, **kwargs):
        """Drop every adapter: the engines hold the base weights again."""
        if self.__dict__.get("_kiln_lora") is None:
            return
        state = self._lora_state()
        state["loras"].clear()
        state["active"] = []
        state["refit"].cache.clear()
        self._apply_loras()

    def get_active_adapters(self) -> list[str]:
        state = self.__dict__.get("_kiln_lora")
        return [n for n, _ in state["active"]] if state else []

    def get_list_adapters(self) -> dict[str, list[str]]:
        state = self.__dict__.get("_kiln_lora")
        out: dict[str, list[str]] = {}
        for name, lora in (state["loras"].items() if state else ()):
            for module in lora.factors:
                out.setdefault(module, []).append(name)
        return out

    def fuse_lora(self, *args, **kwargs):
        raise NotSupportedError("engine pipelines run the merged weights already (set_adapters swaps them in): "
                                "fusing gains nothing; to ship one LoRA baked in, build with kiln build MODEL --lora FILE")

    unfuse_lora = fuse_lora

    def _weights(self, weight, name: str) -> dict[str, float]:
        """One adapter's weight as {module: weight}, checked."""
        modules = self._lora_state()["refit"].modules
        if isinstance(weight, Mapping):
            unknown = [m for m in weight if m not in modules]
            nested = [m for m, w in weight.items() if isinstance(w, Mapping)]
            if unknown or nested:
                raise NotSupportedError(f"adapter {name!r}: weights may be given per module ({', '.join(modules)}), "
                                        f"not for {', '.join(unknown or nested)} (per-block weights are not supported)")
            return {m: float(weight.get(m, 1.0)) for m in modules}
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight != weight:
            raise RequestError(f"adapter {name!r}: a weight must be a number or a {{module: number}} dict, got {weight!r}",
                               field="adapter_weights")
        return {m: float(weight) for m in modules}

    def _apply_loras(self) -> float:
        state = self._lora_state()
        active = state["active"] if state["enabled"] else []
        key = tuple((n, tuple(sorted(w.items()))) for n, w in active)
        return state["refit"].apply(key, [(state["loras"][n], w) for n, w in active])
