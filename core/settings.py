"""Settings: one TOML file, overridden by the environment and the command line.

Precedence, highest first: ``--set section.key=value`` > environment ``LVLMVA_SECTION__KEY`` >
the TOML file > defaults.

- Sections named after a role (``dataset``, ``model``, ``attributor``, ``segmenter``,
  ``critic``, ``judge``, ``aligner``) pick a plugin with ``plugin = "name"``; the other keys of
  such a section are validated against that plugin's ``Options``.
- The roles whose methods a run compares have named instances, one table each:
  ``[mitigators.dfr] plugin = "dfr"``, ``[evaluators.groups] plugin = "standard"``; override one
  with ``--set mitigators.dfr.key=value`` or ``LVLMVA_MITIGATORS__DFR__KEY``. The old singular
  sections ``[mitigator]`` and ``[evaluator]`` are refused with the tables to write instead.
- The core sections (``run``, ``train``, ``selection``, ``render``, ``masks``, ``report``,
  ``study``) have fixed models, in :mod:`lvlmva.options` with :class:`Settings` and
  :class:`PluginChoice` (re-exported here); a stage added by a plugin may bring a section of its
  own.

Unknown keys are errors; secrets never come from a file.
"""

from __future__ import annotations

import codecs
import datetime
import difflib
import os
import re
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, create_model
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from .options import (
    CORE_SECTIONS,
    INSTANCE_SECTIONS,
    PAIRING_KEYS,
    RESERVED_MODEL_NAMES,
    SINGLE_ROLES,
    MaskOptions,
    PluginChoice,
    RenderOptions,
    ReportOptions,
    RunOptions,
    SelectionOptions,
    Settings,
    StudyOptions,
    TrainOptions,
    paired_judge,
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
    "StudyOptions",
    "PluginChoice",
    "Settings",
    "load_settings",
    "parse_overrides",
    "CORE_SECTIONS",
    "SINGLE_ROLES",
    "INSTANCE_SECTIONS",
    "PAIRING_KEYS",
    "RESERVED_MODEL_NAMES",
]

ENV_PREFIX = "LVLMVA_"
SECRET_KEYS = {"api_key", "apikey", "token", "password", "secret", "access_token"}

#: instance names become folder names and environment variables (LVLMVA_MITIGATORS__JTT__LR)
_INSTANCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: keys that were renamed: (section, old key) -> the new dotted key
RENAMED_KEYS: dict[tuple[str, str], str] = {
    ("masks", "true_mask_bound"): "masks.true_mask_reference",
}


class SettingsError(Exception):
    """Bad settings; the message names where the value came from, the dotted key, the value and
    what is allowed."""


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


def _env_overrides(environ: Mapping[str, str], sections: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parsed values of ``LVLMVA_SECTION__KEY`` variables and the text of each."""
    out: dict[str, Any] = {}
    raw_out: dict[str, Any] = {}
    for name, raw in environ.items():
        # LVLMVA_DISABLE_PLUGINS and friends have no "__": they are not settings
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, rest = name[len(ENV_PREFIX) :].partition("__")
        section = section.lower()
        if section not in sections:
            hint = _old_section_hint(section)
            raise SettingsError(
                f"environment {name}: unknown section [{section}]; "
                + (hint or f"{nearest(section, sections)}allowed sections: {', '.join(sections)}")
            )
        dotted = ".".join([section, *(p.lower() for p in rest.split("__"))])
        _set_dotted(out, dotted, _parse_literal(raw), f"environment {name}")
        _set_dotted(raw_out, dotted, raw, f"environment {name}")
    return out, raw_out


#: byte order marks of encodings other than UTF-8 (UTF-32 first: its LE mark starts like UTF-16's)
_OTHER_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(f"{path}: no such settings file") from None
    except IsADirectoryError:
        raise SettingsError(f"{path}: is a folder, not a settings file") from None
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read settings file: {exc.strerror or exc}") from None
    for bom, encoding in _OTHER_BOMS:
        if data.startswith(bom):
            raise SettingsError(f"{path}: {encoding} text (it starts with a {encoding} byte order mark); save the settings file as UTF-8")
    try:
        # Windows Notepad saves UTF-8 with a byte order mark, which TOML does not allow
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise SettingsError(
            f"{path}: not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x}); save the settings file as UTF-8"
        ) from None
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


class _ComposedBase(BaseSettings):
    """The merge of every source, section by section (values are checked afterwards; every
    section is known to be a table). The fields, one per allowed section, are made per registry
    by :func:`_composer`."""

    model_config = SettingsConfigDict(extra="forbid")


def _composer(sections: Sequence[str], layers: tuple[dict, dict, dict]) -> type[BaseSettings]:
    fields: dict[str, Any] = {name: (dict[str, Any] | None, Field(default=None)) for name in sections}

    class _Composed(_ComposedBase):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            overrides, env, file = layers
            # pydantic-settings deep-merges sources (tables inside tables too); earlier ones win.
            return (
                InitSettingsSource(settings_cls, init_kwargs=overrides),
                _DictSource(settings_cls, env),
                _DictSource(settings_cls, file),
            )

    return create_model("_Composed", __base__=_Composed, **fields)


# -- composition and validation -------------------------------------------------------------


class _Provenance:
    def __init__(self, path: Path | None, overrides: dict, env: dict, file: dict) -> None:
        self.path, self.overrides, self.env, self.file = path, overrides, env, file

    def origin(self, dotted: Sequence[str]) -> str:
        for layer, label in (
            (self.overrides, lambda path: "--set " + ".".join(path)),
            (self.env, lambda path: "environment " + ENV_PREFIX + "__".join(p.upper() for p in path)),
            (self.file, lambda path: str(self.path) if self.path else "settings"),
        ):
            node: Any = layer
            for depth, part in enumerate(dotted):
                if not isinstance(node, dict):
                    # a value of this layer holds the rest of the path (an item of a list)
                    return label(dotted[:depth])
                if part not in node:
                    break
                node = node[part]
            else:
                return label(dotted)
        return "defaults"


def nearest(name: str, allowed: Sequence[str]) -> str:
    """ "did you mean ...?" naming the allowed names closest to a misspelt ``name`` (difflib's
    ratio >= 0.6, at most three, closest first), or "" when none is close."""
    close = difflib.get_close_matches(str(name).lower(), list(allowed), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""


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
        return nearest(str(loc[-1]), names) + "allowed keys: " + (", ".join(names) if names else "(none)")
    if "expected" in ctx:
        return f"allowed: {ctx['expected']}"
    for bound, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if bound in ctx:
            return f"allowed: {sign} {ctx[bound]}"
    if err_type == "finite_number":
        field = model.model_fields.get(str(loc[0])) if len(loc) == 1 else None
        bounds = [
            f"{sign} {getattr(meta, bound)}"
            for meta in (field.metadata if field is not None else ())
            for bound, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
            if getattr(meta, bound, None) is not None
        ]
        return "allowed: a finite number" + (" " + " and ".join(bounds) if bounds else "")
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


def _without_union_noise(values: dict[str, Any], errors: list[Any]) -> list[tuple[Any, list[str]]]:
    """Each error with its location as a settings key, without the names pydantic gives the
    branches of a union (``lam.float``, ``lam.tuple[float, ...]``): a branch name is a string
    where the value is not a table. When a value fails every branch of a union and some branch
    failed on more than the value's kind (``inf`` for ``float | tuple[float, ...]``), the errors
    of the branches that only say "not a tuple" are dropped."""
    located = []
    for err in errors:
        loc: list[str] = []
        branch: tuple[str, ...] | None = None
        node: Any = values
        for part in err["loc"]:
            if isinstance(part, str) and not isinstance(node, dict):
                branch = branch or tuple(loc)  # a union's branch name, not a key of the value
                continue
            loc.append(str(part))
            if isinstance(node, dict):
                node = node.get(part)
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                node = None
        located.append((err, loc, branch))

    def kind_only(err: Any) -> bool:
        return str(err["type"]).endswith("_type")

    telling = {branch for err, _, branch in located if branch is not None and not kind_only(err)}
    return [(err, loc) for err, loc, branch in located if not (branch in telling and kind_only(err))]


def _redacted(model: type[PluginOptions], key: str) -> bool:
    """Whether errors about field ``key`` must not show its value (a value that may be a secret
    given where a name was asked for: ``api_key_env``, ``base_url``)."""
    field = model.model_fields.get(key)
    extra = field.json_schema_extra if field is not None else None
    return isinstance(extra, dict) and bool(extra.get("redact_errors"))


def _validate_section(
    dotted_section: Sequence[str],
    model: type[PluginOptions],
    values: dict[str, Any],
    prov: _Provenance,
    label: str,
    raw: dict[str, Any] | None = None,
    plugin_keys: bool = False,
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
        errors = _without_union_noise(values, exc.errors())
        for err, loc in errors:
            dotted = [*dotted_section, *loc]
            node: Any = values
            for part in loc:
                node = node.get(part, None) if isinstance(node, dict) else None
            value = err.get("input", node)
            shown = "<hidden>" if loc and _redacted(model, loc[0]) else repr(value)
            renamed = RENAMED_KEYS.get((dotted_section[0], loc[0])) if len(loc) == 1 else None
            if err["type"] == "extra_forbidden" and renamed:
                lines.append(f"{prov.origin(dotted)}: {'.'.join(dotted)} was renamed: write {renamed}")
                continue
            allowed = _describe_allowed(model, loc, err["type"], err.get("ctx") or {}, ("plugin",) if plugin_keys else ())
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            line = f"{prov.origin(dotted)}: {'.'.join(dotted)} = {shown}: {msg}"
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


def _slot_paths(*layers: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """(slot, role, path) of every plugin slot any layer names: role sections and instances."""
    out = [(role, role, (role,)) for role in SINGLE_ROLES]
    for section, role in INSTANCE_SECTIONS.items():
        names: list[str] = []
        for layer in layers:
            table = layer.get(section)
            if isinstance(table, dict):
                names += [n for n in table if n not in names]
        out += [(f"{section}.{n}", role, (section, n)) for n in names]
    return out


def _at(layer: dict[str, Any], path: Sequence[str]) -> Any:
    node: Any = layer
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _drop_keys_of_replaced_plugins(registry: PluginRegistry, *layers: dict[str, Any]) -> None:
    """When a higher layer (``--set``, then the environment) picks another plugin for a slot,
    the lower layers' keys that the new plugin does not take belonged to the old one: drop
    them, so that ``--set critic.plugin=openai`` works on a file written for the oracle (keys
    both plugins take, such as a temperature, still apply)."""
    for _slot, role, path in _slot_paths(*layers):
        chosen = None
        for layer in layers:
            section = _at(layer, path)
            if not isinstance(section, dict):
                continue
            if chosen is None:
                chosen = section.get("plugin")
                continue
            if section.get("plugin", chosen) == chosen:
                continue
            try:
                accepted = set(registry.get(role, str(chosen)).Options.model_fields)
                accepted |= {PAIRING_KEYS[role]} if role in PAIRING_KEYS else set()
            except PluginError:
                break  # the unknown plugin name is reported when the section is validated
            parent = _at(layer, path[:-1]) if len(path) > 1 else layer
            parent[path[-1]] = {k: v for k, v in section.items() if k in accepted}


def _old_section_hint(section: str, values: Any = None) -> str | None:
    """How to write a singular ``[mitigator]`` / ``[evaluator]`` section now, or ``None``."""
    plural = f"{section}s"
    if plural not in INSTANCE_SECTIONS:
        return None
    if not isinstance(values, dict) or "plugin" not in values:
        return f"[{section}] is written [{plural}.<name>] now, one table per named instance (e.g. [{plural}.standard] plugin = \"standard\")"
    import tomli_w

    name = re.sub(r"[^a-z0-9_]", "_", str(values["plugin"]).lower()) or "main"
    if not name[0].isalpha():
        name = f"m_{name}"
    table = tomli_w.dumps({plural: {name: values}}).strip()
    return (
        f"[{section}] is written [{plural}.<name>] now, one table per named instance; "
        f"replace it with:\n{textwrap.indent(table, '    ')}"
    )


def load_settings(
    path: str | Path | None,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    environ: Mapping[str, str] | None = None,
    registry: PluginRegistry | None = None,
) -> Settings:
    """Compose and validate settings; raises :class:`SettingsError` naming every problem."""
    path = Path(path) if path is not None else None
    registry = registry or get_registry()
    stage_sections = {
        name: model for name, model in registry.stage_sections().items()
        if name not in CORE_SECTIONS and name not in ROLES and name not in INSTANCE_SECTIONS
    }  # fmt: skip
    core_models: dict[str, type[PluginOptions]] = {**CORE_SECTIONS, **stage_sections}
    sections = [*CORE_SECTIONS, *SINGLE_ROLES, *INSTANCE_SECTIONS, *stage_sections]
    file_layer = _read_toml(path) if path is not None else {}
    if isinstance(overrides, Mapping):
        over_layer, over_raw = dict(overrides), {}
    else:
        over_layer, over_raw = _parse_overrides(overrides)
    env_layer, env_raw = _env_overrides(os.environ if environ is None else environ, sections)
    label = str(path) if path else "settings"
    _check_no_secrets(file_layer, label)
    _check_no_secrets(over_layer, "--set")
    _check_no_secrets(env_layer, "environment")
    prov = _Provenance(path, over_layer, env_layer, file_layer)

    unknown = []
    for layer in (file_layer, over_layer):
        for key in layer:
            if key in sections:
                continue
            hint = _old_section_hint(key, layer[key])
            unknown.append(f"{prov.origin([key])}: " + (hint or f"unknown section [{key}]; {nearest(key, sections)}allowed sections: {', '.join(sections)}"))
    if unknown:
        raise SettingsError("\n".join(unknown))
    # A value where a table belongs is not shown: it may be a key pasted in the wrong place.
    not_tables = [
        f"{prov.origin([key])}: [{key}] must be a table of settings, not a {type(value).__name__}"
        for layer in (file_layer, env_layer, over_layer)
        for key, value in layer.items()
        if not isinstance(value, dict)
    ]
    if not_tables:
        raise SettingsError("\n".join(dict.fromkeys(not_tables)))
    _drop_keys_of_replaced_plugins(registry, over_layer, env_layer, file_layer)

    def raw_text(path_: Sequence[str]) -> dict[str, Any]:
        """The text of each key under ``path_`` whose value came from --set or the environment."""
        out = {}
        over, env = _at(over_raw, path_) or {}, _at(env_raw, path_) or {}
        for key in {**env, **over}:
            origin = prov.origin([*path_, key])
            layer = over if origin.startswith("--set") else env if origin.startswith("environment") else {}
            if key in layer:
                out[key] = layer[key]
        return out

    try:
        composed = _composer(sections, (over_layer, env_layer, file_layer))()
    except ValidationError as exc:
        raise SettingsError(f"{label}: {exc}") from None

    problems: list[str] = []
    core: dict[str, PluginOptions] = {}
    for section, model in core_models.items():
        try:
            core[section] = _validate_section(
                [section], model, getattr(composed, section) or {}, prov, "", raw_text([section])
            )
        except SettingsError as exc:
            problems.append(str(exc))

    slots: list[tuple[str, str, tuple[str, ...], dict[str, Any]]] = []
    for role in SINGLE_ROLES:
        values = getattr(composed, role)
        if values:
            slots.append((role, role, (role,), dict(values)))
    for section, role in INSTANCE_SECTIONS.items():
        for instance, values in (getattr(composed, section) or {}).items():
            where = prov.origin([section, instance])
            if not isinstance(values, dict):
                problems.append(f"{where}: {section}.{instance} must be a table with plugin = \"...\", not a {type(values).__name__}")
            elif not _INSTANCE_NAME.match(instance):
                problems.append(
                    f"{where}: [{section}.{instance}]: an instance name is lower-case letters, digits "
                    "and _ , starting with a letter (it names a folder and environment variables)"
                )
            elif role == "mitigator" and instance in RESERVED_MODEL_NAMES:
                problems.append(
                    f"{where}: [{section}.{instance}]: {instance!r} names one of the run's own models "
                    f"({', '.join(RESERVED_MODEL_NAMES)}); pick another name"
                )
            else:
                slots.append((f"{section}.{instance}", role, (section, instance), dict(values)))

    plugins: dict[str, PluginChoice] = {}
    pairing: dict[str, tuple[Any, str]] = {}  # critic slot -> (judge = value, where it was written)
    for slot, role, path_, values in slots:
        if role in PAIRING_KEYS and PAIRING_KEYS[role] in values:
            key = PAIRING_KEYS[role]
            pairing[slot] = (values.pop(key), prov.origin([*path_, key]))
        name = values.pop("plugin", None)
        if name is None:
            problems.append(
                f"{prov.origin(list(path_))}: [{slot}] needs plugin = \"name\"; "
                f"registered: {', '.join(registry.names(role)) or '(none)'}"
            )
            continue
        try:
            cls = registry.get(role, str(name))
        except PluginError as exc:
            problems.append(f"{prov.origin([*path_, 'plugin'])}: {slot}.plugin = {name!r}: {exc}")
            continue
        try:
            options = _validate_section(
                list(path_), cls.Options, values, prov, f"{role} plugin {name!r}", raw_text(path_), plugin_keys=True
            )
        except SettingsError as exc:
            problems.append(str(exc))
            continue
        plugins[slot] = PluginChoice(role, str(name), options, slot)
    problems += _one_form_per_role(plugins, prov)
    if not problems:
        problems += _pair_critics_with_judges(plugins, pairing, prov)
    if problems:
        raise SettingsError("\n".join(problems))
    return Settings(source=path, core=core, plugins=plugins)


def _one_form_per_role(plugins: dict[str, PluginChoice], prov: _Provenance) -> list[str]:
    """A role is given by its one-instance section or by named instances, not both (which
    one would a stage's name and a model's label belong to?)."""
    problems = []
    for section, role in INSTANCE_SECTIONS.items():
        named = [slot for slot in plugins if slot.startswith(f"{section}.")]
        if role in plugins and named:
            problems.append(
                f"{prov.origin([role])}: [{role}] and [{named[0]}] are both set: write every {role} "
                f"as a named instance ([{section}.<name>]) when there are several"
            )
    return problems


def _pair_critics_with_judges(
    plugins: dict[str, PluginChoice], pairing: Mapping[str, tuple[Any, str]], prov: _Provenance
) -> list[str]:
    """Give each critic its judge: the one a ``judge = "<name>"`` key names (a
    ``[judges.<name>]`` instance), or the run's only judge. Every named judge must be read by a
    critic."""
    from dataclasses import replace

    judges = [c.slot for c in plugins.values() if c.role == "judge"]
    problems: list[str] = []
    used: set[str] = set()
    for slot, critic in list(plugins.items()):
        if critic.role != "critic":
            continue
        chosen = paired_judge(pairing[slot][0] if slot in pairing else None, judges)
        if slot in pairing and chosen not in plugins:
            value, where = pairing[slot]
            named = ", ".join(j.partition(".")[2] for j in judges if "." in j) or "none"
            problems.append(f"{where}: {slot}.judge = {value!r} names no [judges.{value}] table (named judges: {named})")
            continue
        if chosen is None:
            if judges:  # none: the critic stage says it needs a judge
                problems.append(
                    f"{prov.origin(slot.split('.'))}: [{slot}] needs judge = \"<name>\": the run has several judges "
                    f"({', '.join(judges)})"
                )
            continue
        used.add(chosen)
        plugins[slot] = replace(critic, judge=chosen)
    for judge in judges:
        if "." in judge and judge not in used and any(c.role == "critic" for c in plugins.values()) and not problems:
            problems.append(f"{prov.origin(judge.split('.'))}: [{judge}] is the judge of no critic: name it in a critic's judge = \"...\"")
    return problems
