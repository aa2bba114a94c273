"""Settings: one TOML file, overridden by the environment and the command line.

Precedence, highest first: ``--set section.key=value`` > environment ``LVLMVA_SECTION__KEY`` >
the TOML file > defaults. Sections named after a role (``dataset``, ``model``, ``attributor``,
``segmenter``, ``critic``, ``judge``, ``aligner``, ``mitigator``, ``evaluator``) pick a plugin
with ``plugin = "name"``; the other keys of such a section are validated against that plugin's
``Options``. The core sections (``run``, ``train``, ``selection``, ``render``, ``masks``, ``report``) have
fixed models below. Unknown keys are errors; secrets never come from a file.
"""

from __future__ import annotations

import datetime
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .protocols import ROLES, PluginOptions
from .registry import PluginError, PluginRegistry, get_registry

__all__ = [
    "SettingsError",
    "RunOptions",
    "TrainOptions",
    "SelectionOptions",
    "RenderOptions",
    "MaskOptions",
    "ReportOptions",
    "PluginChoice",
    "Settings",
    "load_settings",
    "parse_overrides",
    "CORE_SECTIONS",
]

ENV_PREFIX = "LVLMVA_"
SECRET_KEYS = {"api_key", "apikey", "token", "password", "secret", "access_token"}


class SettingsError(Exception):
    """Bad settings; the message names where the value came from, the dotted key, the value and
    what is allowed."""


# -- core sections --------------------------------------------------------------------------


class RunOptions(PluginOptions):
    """Where and how a run happens."""

    name: str | None = Field(None, description="Run name; the run directory is out_dir/name. Default: the settings file's stem.")
    out_dir: Path = Field(Path("runs"), description="Folder that holds run directories.")
    seed: int = Field(0, description="Seed for torch, numpy, random, data order, backgrounds, GMM init.")
    device: str = Field("auto", description='"auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...')
    cache_dir: Path | None = Field(None, description="User cache (downloaded data, LVLM responses). Default: $XDG_CACHE_HOME/lvlmva or ~/.cache/lvlmva.")
    deterministic: bool = Field(True, description="Ask torch for deterministic kernels (same settings + seed + device = same numbers).")

    @field_validator("device")
    @classmethod
    def _device_parses(cls, value: str) -> str:
        # Only the spelling is checked here: whether CUDA is present is known where the run starts.
        if value != "auto":
            import torch

            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError(f"{value!r} is not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") from None
        return value


class TrainOptions(PluginOptions):
    """Training of the original model f (Adam)."""

    epochs: int = Field(3, ge=0, description="Passes over the training split.")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate.")
    batch_size: int = Field(64, ge=1, description="Samples per step.")
    weight_decay: float = Field(0.0, ge=0, description="Adam weight decay.")
    resident: Literal["auto", "always", "never"] = Field(
        "auto",
        description='Slice tensors held in memory instead of a DataLoader: "auto" when the split fits in memory.',
        json_schema_extra={"fingerprint": False},
    )


class SelectionOptions(PluginOptions):
    """Choice of the alignment samples."""

    strategy: Literal["lowest-entropy", "random", "highest-entropy"] = Field(
        "lowest-entropy", description="Which training samples become alignment samples (predictive entropy of f)."
    )
    n: int = Field(64, ge=1, description="Number of alignment samples.")


class RenderOptions(PluginOptions):
    """Images shown to the Critic."""

    size: int = Field(224, ge=28, description="Minimum side in pixels after nearest-neighbour upscaling.")
    palette: list[str] = Field(
        default_factory=lambda: ["red", "blue", "green", "yellow", "pink", "brown", "grey", "orange", "purple"],
        description="Ordered colour names for clusters 0..J-1 (from lvlmva.rendering.PALETTE).",
    )
    overlay_alpha: float = Field(0.45, ge=0, le=1, description="Opacity of the cluster map in the overlay image.")

    @field_validator("palette")
    @classmethod
    def _known_colours(cls, names: list[str]) -> list[str]:
        from .rendering import palette_for

        palette_for(names)  # raises ValueError naming the unknown or repeated colour
        return names


class MaskOptions(PluginOptions):
    """Correction masks for alignment."""

    source: Literal["verdicts", "true"] = Field(
        "verdicts",
        description='"verdicts": clusters judged "no" (the method); "true": the data set\'s true spurious masks (RRR with true masks, needs no critic or judge).',
    )
    true_mask_bound: bool = Field(
        True,
        description="Also align with the true masks of the same alignment samples, where the data set has them, as the upper bound to compare against.",
    )


class ReportOptions(PluginOptions):
    """The report written at the end of a run."""

    enabled: bool = Field(True, description="Write report.md and figures.")
    samples: int = Field(16, ge=0, description="Alignment samples shown in the figure grid.")
    test_images: int = Field(8, ge=0, description="Test images whose attributions are shown before/after alignment.")


CORE_SECTIONS: dict[str, type[PluginOptions]] = {
    "run": RunOptions,
    "train": TrainOptions,
    "selection": SelectionOptions,
    "render": RenderOptions,
    "masks": MaskOptions,
    "report": ReportOptions,
}


@dataclass(frozen=True)
class PluginChoice:
    """The plugin a role section picked and its validated options."""

    role: str
    name: str
    options: PluginOptions

    def as_dict(self) -> dict[str, Any]:
        return {"plugin": self.name, **self.options.model_dump(mode="json")}


@dataclass(frozen=True)
class Settings:
    """Validated, composed settings of one run."""

    source: Path | None
    core: dict[str, PluginOptions]
    plugins: dict[str, PluginChoice]

    @property
    def run(self) -> RunOptions:
        return self.core["run"]  # type: ignore[return-value]

    @property
    def train(self) -> TrainOptions:
        return self.core["train"]  # type: ignore[return-value]

    @property
    def selection(self) -> SelectionOptions:
        return self.core["selection"]  # type: ignore[return-value]

    @property
    def render(self) -> RenderOptions:
        return self.core["render"]  # type: ignore[return-value]

    @property
    def masks(self) -> MaskOptions:
        return self.core["masks"]  # type: ignore[return-value]

    @property
    def report(self) -> ReportOptions:
        return self.core["report"]  # type: ignore[return-value]

    def section(self, name: str) -> dict[str, Any] | None:
        """The resolved section as plain JSON-able data (``None`` for an unset role)."""
        if name in self.core:
            return self.core[name].model_dump(mode="json")
        choice = self.plugins.get(name)
        return None if choice is None else choice.as_dict()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in [*CORE_SECTIONS, *ROLES]:
            value = self.section(name)
            if value is not None:
                out[name] = value
        return out

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.as_dict()))

    @property
    def run_name(self) -> str:
        if self.run.name:
            return self.run.name
        return self.source.stem if self.source is not None else "run"


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# -- sources --------------------------------------------------------------------------------


def _parse_literal(text: str) -> Any:
    """A value from the command line or the environment: a TOML literal (``3``, ``1e-5``,
    ``true``, ``[256, 128]``, ``"x"``) when it parses as one, else the plain string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, (datetime.date, datetime.time)) else value


def _set_dotted(target: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if any(not p for p in parts) or len(parts) < 2:
        raise SettingsError(f"{origin}: {dotted!r} must be 'section.key' (e.g. train.epochs)")
    node = target
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SettingsError(f"{origin}: {'.'.join(parts[:-1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "critic.model=gpt-5"]`` -> nested dict of parsed values."""
    return _parse_overrides(items)[0]


def _parse_overrides(items: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parsed values and, in the same layout, the text they were parsed from."""
    out: dict[str, Any] = {}
    raw_out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SettingsError(f"--set {item!r}: expected section.key=value")
        _set_dotted(out, key.strip(), _parse_literal(raw.strip()), f"--set {item!r}")
        _set_dotted(raw_out, key.strip(), raw.strip(), f"--set {item!r}")
    return out, raw_out


def _env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parsed values of ``LVLMVA_SECTION__KEY`` variables and the text of each."""
    sections = set(CORE_SECTIONS) | set(ROLES)
    out: dict[str, Any] = {}
    raw_out: dict[str, Any] = {}
    for name, raw in environ.items():
        # LVLMVA_DISABLE_PLUGINS and friends have no "__": they are not settings
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, rest = name[len(ENV_PREFIX) :].partition("__")
        section = section.lower()
        if section not in sections:
            allowed = ", ".join([*CORE_SECTIONS, *ROLES])
            raise SettingsError(
                f"environment {name}: unknown section [{section}]; allowed sections: {allowed}"
            )
        dotted = ".".join([section, *(p.lower() for p in rest.split("__"))])
        _set_dotted(out, dotted, _parse_literal(raw), f"environment {name}")
        _set_dotted(raw_out, dotted, raw, f"environment {name}")
    return out, raw_out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such settings file") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: not valid TOML: {exc}") from None


class _DictSource(PydanticBaseSettingsSource):
    """A settings source over a dict that was parsed (and given provenance) beforehand."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


def _section_field() -> Any:
    return Field(default=None)


class _Composed(BaseSettings):
    """The merge of every source, section by section (values checked afterwards)."""

    model_config = SettingsConfigDict(extra="forbid")

    run: dict[str, Any] | None = _section_field()
    train: dict[str, Any] | None = _section_field()
    selection: dict[str, Any] | None = _section_field()
    render: dict[str, Any] | None = _section_field()
    masks: dict[str, Any] | None = _section_field()
    report: dict[str, Any] | None = _section_field()
    dataset: dict[str, Any] | None = _section_field()
    model: dict[str, Any] | None = _section_field()
    attributor: dict[str, Any] | None = _section_field()
    segmenter: dict[str, Any] | None = _section_field()
    critic: dict[str, Any] | None = _section_field()
    judge: dict[str, Any] | None = _section_field()
    aligner: dict[str, Any] | None = _section_field()
    mitigator: dict[str, Any] | None = _section_field()
    evaluator: dict[str, Any] | None = _section_field()

    _layers: tuple[dict[str, Any], dict[str, Any], dict[str, Any]] = ({}, {}, {})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        overrides, env, file = cls._layers
        # pydantic-settings deep-merges sources; earlier ones win.
        return (
            InitSettingsSource(settings_cls, init_kwargs=overrides),
            _DictSource(settings_cls, env),
            _DictSource(settings_cls, file),
        )

    @model_validator(mode="before")
    @classmethod
    def _sections_are_tables(cls, data: Any) -> Any:
        for key, value in (data or {}).items():
            if key in cls.model_fields and value is not None and not isinstance(value, dict):
                raise ValueError(f"[{key}] must be a table of settings, got {value!r}")
        return data


assert set(_Composed.model_fields) == set(CORE_SECTIONS) | set(ROLES), "every section needs a field"


# -- composition and validation -------------------------------------------------------------


class _Provenance:
    def __init__(self, path: Path | None, overrides: dict, env: dict, file: dict) -> None:
        self.path, self.overrides, self.env, self.file = path, overrides, env, file

    def origin(self, dotted: Sequence[str]) -> str:
        for layer, label in (
            (self.overrides, "--set " + ".".join(dotted)),
            (self.env, "environment " + ENV_PREFIX + "__".join(p.upper() for p in dotted)),
            (self.file, str(self.path) if self.path else "settings"),
        ):
            node: Any = layer
            for part in dotted:
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return label
        return "defaults"


def _describe_allowed(
    model: type[PluginOptions], loc: Sequence[str | int], err_type: str, ctx: dict, extra_keys: Sequence[str] = ()
) -> str:
    if err_type == "extra_forbidden":
        target: Any = model
        for part in loc[:-1]:
            field = getattr(target, "model_fields", {}).get(part)
            target = getattr(field, "annotation", None)
        names = sorted(getattr(target, "model_fields", {}) or [])
        if len(loc) == 1:
            names = [*extra_keys, *names]
        return "allowed keys: " + (", ".join(names) if names else "(none)")
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for bound, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"allowed: {sign} {ctx[bound]}"
    return ""


def _as_typed_text(values: dict[str, Any], raw: dict[str, Any], exc: ValidationError) -> dict[str, Any] | None:
    """``values`` with each rejected top-level value that came from ``--set`` or the environment
    replaced by its text, when parsing it as a TOML literal made it a non-string: ``true`` for
    ``masks.source = "true"``, ``2024`` for a run name. ``None`` when nothing can be retried."""
    retry = dict(values)
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        text = raw.get(key)
        if isinstance(text, str) and key in values and not isinstance(values[key], str):
            retry[key] = text
    return retry if retry != values else None


def _validate_section(
    section: str,
    model: type[PluginOptions],
    values: dict[str, Any],
    prov: _Provenance,
    label: str,
    raw: dict[str, Any] | None = None,
) -> PluginOptions:
    try:
        return model.model_validate(values)
    except ValidationError as first:
        retry = _as_typed_text(values, raw or {}, first)
        exc = first
        if retry is not None:
            try:
                return model.model_validate(retry)
            except ValidationError:
                pass  # report the errors of the values as parsed
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"]]
            dotted = [section, *loc]
            node: Any = values
            for part in loc:
                node = node.get(part, None) if isinstance(node, dict) else None
            value = err.get("input", node)
            allowed = _describe_allowed(
                model, loc, err["type"], err.get("ctx") or {}, ("plugin",) if section in ROLES else ()
            )
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            line = f"{prov.origin(dotted)}: {'.'.join(dotted)} = {value!r}: {msg}"
            if label:
                line += f" ({label})"
            if allowed and allowed.removeprefix("allowed: ") not in msg:
                line += f"; {allowed}"
            lines.append(line)
        raise SettingsError("\n".join(lines)) from None


def _check_no_secrets(layer: dict[str, Any], label: str, trail: tuple[str, ...] = ()) -> None:
    for key, value in layer.items():
        if isinstance(value, dict):
            _check_no_secrets(value, label, (*trail, key))
        elif key.lower() in SECRET_KEYS:
            raise SettingsError(
                f"{label}: {'.'.join((*trail, key))}: secrets are read from the environment only; "
                "put the variable's name in the plugin's *_env option (e.g. api_key_env = \"OPENAI_API_KEY\")"
            )


def _drop_keys_of_replaced_plugins(registry: PluginRegistry, *layers: dict[str, Any]) -> None:
    """When a higher layer (``--set``, then the environment) picks another plugin for a role,
    the lower layers' keys that the new plugin does not take belonged to the old one: drop
    them, so that ``--set critic.plugin=openai`` works on a file written for the oracle (keys
    both plugins take, such as a temperature, still apply)."""
    for role in ROLES:
        chosen = None
        for layer in layers:
            section = layer.get(role)
            if not isinstance(section, dict):
                continue
            if chosen is None:
                chosen = section.get("plugin")
                continue
            if section.get("plugin", chosen) == chosen:
                continue
            try:
                accepted = set(registry.get(role, str(chosen)).Options.model_fields)
            except PluginError:
                return  # the unknown plugin name is reported when the section is validated
            layer[role] = {k: v for k, v in section.items() if k in accepted}


def load_settings(
    path: str | Path | None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    environ: Mapping[str, str] | None = None,
    registry: PluginRegistry | None = None,
) -> Settings:
    """Compose and validate settings; raises :class:`SettingsError` naming every problem."""
    path = Path(path) if path is not None else None
    file_layer = _read_toml(path) if path is not None else {}
    if isinstance(overrides, Mapping):
        over_layer, over_raw = dict(overrides), {}
    else:
        over_layer, over_raw = _parse_overrides(overrides)
    env_layer, env_raw = _env_overrides(os.environ if environ is None else environ)
    label = str(path) if path else "settings"
    registry = registry or get_registry()
    _drop_keys_of_replaced_plugins(registry, over_layer, env_layer, file_layer)
    _check_no_secrets(file_layer, label)
    _check_no_secrets(over_layer, "--set")
    _check_no_secrets(env_layer, "environment")
    prov = _Provenance(path, over_layer, env_layer, file_layer)

    def raw_text(section: str) -> dict[str, Any]:
        """The text of each key of ``section`` whose value came from --set or the environment."""
        out = {}
        for key in {**env_raw.get(section, {}), **over_raw.get(section, {})}:
            origin = prov.origin([section, key])
            layer = over_raw if origin.startswith("--set") else env_raw if origin.startswith("environment") else {}
            if key in layer.get(section, {}):
                out[key] = layer[section][key]
        return out

    unknown = [k for k in (*file_layer, *over_layer) if k not in _Composed.model_fields]
    if unknown:
        allowed = ", ".join([*CORE_SECTIONS, *ROLES])
        raise SettingsError(
            "\n".join(f"{prov.origin([k])}: unknown section [{k}]; allowed sections: {allowed}" for k in unknown)
        )

    _Composed._layers = (over_layer, env_layer, file_layer)
    try:
        composed = _Composed()
    except ValidationError as exc:
        raise SettingsError(f"{label}: {exc}") from None
    finally:
        _Composed._layers = ({}, {}, {})

    problems: list[str] = []
    core: dict[str, PluginOptions] = {}
    for section, model in CORE_SECTIONS.items():
        try:
            core[section] = _validate_section(
                section, model, getattr(composed, section) or {}, prov, "", raw_text(section)
            )
        except SettingsError as exc:
            problems.append(str(exc))
    plugins: dict[str, PluginChoice] = {}
    for role in ROLES:
        values = dict(getattr(composed, role) or {})
        if not values:
            continue
        name = values.pop("plugin", None)
        if name is None:
            problems.append(f"{prov.origin([role])}: [{role}] needs plugin = \"name\"; registered: {', '.join(registry.names(role)) or '(none)'}")
            continue
        try:
            cls = registry.get(role, str(name))
        except PluginError as exc:
            problems.append(f"{prov.origin([role, 'plugin'])}: {role}.plugin = {name!r}: {exc}")
            continue
        try:
            options = _validate_section(
                role, cls.Options, values, prov, f"{role} plugin {name!r}", raw_text(role)
            )
        except SettingsError as exc:
            problems.append(str(exc))
            continue
        plugins[role] = PluginChoice(role, str(name), options)
    if problems:
        raise SettingsError("\n".join(problems))
    return Settings(source=path, core=core, plugins=plugins)
