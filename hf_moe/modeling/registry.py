"""The routing methods hf_moe knows, by name: the one place the package asks which routing a model,
a config or a ``model_type`` has.

`register_routing` adds a method (a `RoutingMethod` subclass) and registers its config and model
classes with transformers' Auto classes; ``hf_moe/modeling/__init__.py`` registers Switch and Expert
Choice, and code outside the package registers its own the same way.
"""

from collections.abc import Mapping

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .routing import RoutingMethod

# The Auto class of each head, in the order of `RoutingMethod.model_classes`.
HEAD_AUTO_CLASSES = (AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification)

_METHODS: dict[str, type[RoutingMethod]] = {}


def register_routing(method: type[RoutingMethod]) -> type[RoutingMethod]:
    """Register ``method`` under ``method.name`` (idempotent for the same method), its config under its
    ``model_type`` with `AutoConfig`, and its model classes with `AutoModel`, `AutoModelForCausalLM`
    and `AutoModelForSequenceClassification`; all of them save their code and ``auto_map`` with
    checkpoints for ``trust_remote_code`` loading. Returns ``method``."""
    problems = []
    if not (isinstance(method, type) and issubclass(method, RoutingMethod)):
        raise TypeError(f"register_routing takes a RoutingMethod subclass, got {method!r}")
    name = getattr(method, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        problems.append(f"name must be an identifier (the --routing value), got {name!r}")
    model_type = getattr(getattr(method, "config_class", None), "model_type", None)
    if not isinstance(model_type, str) or not model_type:
        problems.append(
            f"config_class must be a config class with a model_type, got {getattr(method, 'config_class', None)!r}"
        )
    classes = getattr(method, "model_classes", None)
    if not isinstance(classes, tuple) or len(classes) != len(HEAD_AUTO_CLASSES):
        problems.append(f"model_classes must be (base model, causal LM, sequence classifier), got {classes!r}")
    taken = {m.name: m for m in _METHODS.values() if m is not method}
    if name in taken:
        problems.append(f"name {name!r} is taken by {taken[name].__name__}")
    owner = next((m for m in taken.values() if m.config_class.model_type == model_type), None)
    if owner is not None:
        problems.append(f"model_type {model_type!r} is taken by {owner.__name__}")
    if problems:
        raise ValueError(f"Cannot register routing method {method.__name__}:\n  - " + "\n  - ".join(problems))
    config_class = method.config_class
    AutoConfig.register(model_type, config_class, exist_ok=True)
    config_class.register_for_auto_class()
    for auto_class, model_class in zip(HEAD_AUTO_CLASSES, classes, strict=True):
        auto_class.register(config_class, model_class, exist_ok=True)
        model_class.register_for_auto_class(auto_class.__name__)
    _METHODS[name] = method
    return method


def routing_method(name: str) -> type[RoutingMethod]:
    """The method registered as ``name`` (the ``--routing`` value)."""
    if name not in _METHODS:
        raise ValueError(f"routing must be one of {routing_names()}, got {name!r}")
    return _METHODS[name]


def routing_method_of(config_or_model_type) -> type[RoutingMethod] | None:
    """The method of an hf_moe config, model, config.json dict or ``model_type``; None for anything else
    (dense and native MoE models included)."""
    source = config_or_model_type
    if hasattr(source, "get_base_model"):  # a PEFT model
        source = source.get_base_model()
    if hasattr(source, "config") and not isinstance(source, Mapping):  # a model
        source = source.config
    model_type = source.get("model_type") if isinstance(source, Mapping) else getattr(source, "model_type", source)
    return next((m for m in _METHODS.values() if m.config_class.model_type == model_type), None)


def routing_names() -> list[str]:
    """The registered routing names, in registration order."""
    return list(_METHODS)


def model_types() -> tuple[str, ...]:
    """The ``model_type`` of every registered routing method's checkpoints."""
    return tuple(m.config_class.model_type for m in _METHODS.values())


class RoutingConfigs(Mapping):
    """Routing name -> config class, read from the registry at each access (so methods registered
    after import, such as a user's, are included)."""

    def __getitem__(self, name: str) -> type:
        if name not in _METHODS:
            raise KeyError(name)
        return _METHODS[name].config_class

    def __iter__(self):
        return iter(list(_METHODS))

    def __len__(self) -> int:
        return len(_METHODS)


ROUTING_CONFIGS = RoutingConfigs()
