"""params.yaml as one typed object: its sections (pipeline.sections), the rules across them, and
each named client setting resolved once (its scheme, its client, its attack). A bad file is one
line naming the key."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from pipeline.errors import PipelineError
from pipeline.sections import (
    TUNABLE_CHOICES,
    TUNABLE_NUMBERS,
    AttackParams,
    ClientParams,
    DataParams,
    EvaluateParams,
    ExtractParams,
    ModelParams,
    ReportParams,
    SchemeParams,
    SettingParams,
    TrainParams,
    TuneParams,
    _Section,
    pairs_with,
)


@dataclass(frozen=True)
class Setting:
    """A named client setting as it runs: the scheme whose checkpoints it uploads from, the client
    (the `client` section changed by the setting's keys) and the attack (`attack` changed by its
    `attack:` keys)."""

    name: str
    scheme: str
    client: ClientParams
    attack: AttackParams


class Params(_Section):
    seed: int = Field(ge=0)
    data: DataParams
    model: ModelParams
    train: TrainParams
    schemes: dict[str, SchemeParams] = Field(min_length=1)
    extract: ExtractParams
    client: ClientParams
    settings: dict[str, SettingParams] = Field(min_length=1)
    attack: AttackParams
    tune: TuneParams
    evaluate: EvaluateParams
    report: ReportParams
    _settings: dict[str, Setting] = PrivateAttr(default_factory=dict)  # each setting resolved once

    @model_validator(mode="after")
    def _consistent(self) -> Params:
        for epoch in self.extract.epochs:
            if epoch > self.train.epochs:
                raise ValueError(
                    f"extract.epochs: checkpoint epoch {epoch} is past the last one trained "
                    f"(train.epochs is {self.train.epochs})"
                )
        for name, scheme in self.schemes.items():
            if scheme.maxpool_kernel is not None and self.model.arch not in ("resnet18", "convnet"):
                raise ValueError(
                    f"schemes.{name}.maxpool_kernel: {self.model.arch} has no stem maxpool to enlarge "
                    "(resnet18 and convnet have)"
                )
            processes = self.train.devices * self.train.num_nodes
            if (self.train.batch_size * scheme.batch_multiplier) % processes:
                raise ValueError(
                    f"schemes.{name}: the global batch {self.train.batch_size * scheme.batch_multiplier} "
                    f"does not split evenly over {processes} processes"
                )
            _check_name("schemes", name)
            if scheme.bottleneck is not None and self.model.arch != "convnet":
                raise ValueError(
                    f"schemes.{name}.bottleneck: PRECODE's block is built and measured on the convnet only "
                    f"(the rank analysis reads {self.model.arch}'s classifier by its own name)"
                )
        self._check_attack(self.attack, "attack")
        for name, setting in self.settings.items():
            _check_name("settings", name)
            if setting.scheme not in self.schemes:
                raise ValueError(
                    f"settings.{name}.scheme: {setting.scheme!r} is not a scheme; "
                    f"params.yaml defines {', '.join(self.schemes)}"
                )
            client = self._resolve(name)
            attack, where = self._attack(name), f"settings.{name}.attack" if setting.attack else "attack"
            self._settings[name] = Setting(name, setting.scheme, client, attack)
            if (
                client.dp is not None
                and client.dp.kind == "per-sample"
                and client.mode == "train"
                and self.schemes[setting.scheme].norm != "group"
            ):
                raise ValueError(
                    f"settings.{name}: per-sample DP cannot run through train-mode BatchNorm, which "
                    "ties the samples together (use mode: eval or a scheme with norm: group)"
                )
            if self.schemes[setting.scheme].bottleneck is not None:
                _check_bottleneck_client(name, client, attack)
            if attack.labels == "idlg" and client.batch_size != 1:
                raise ValueError(f"{where}.labels: 'idlg' needs batch_size 1 (settings.{name} has {client.batch_size})")
            if setting.attack:
                self._check_attack(attack, where)
            if attack.hyperparameters == "tuned":
                self._check_space(attack, where)
            if client.defense is not None and attack.client_model == "exact" and attack.compile:
                raise ValueError(
                    f"{where}.compile: the compiled step does not apply settings.{name}'s defense to its dummy "
                    "upload (compile: false, or client_model: plain)"
                )
            if client.defense is not None and attack.local_steps_model == "sme" and client.local_steps > 1:
                raise ValueError(
                    f"{where}.local_steps_model: SME's surrogate steps along the upload, which settings.{name}'s "
                    "defense has changed (unrolled)"
                )
            if attack.bn_statistics == "from-buffers" and not client.upload_buffers:
                raise ValueError(
                    f"{where}.bn_statistics: 'from-buffers' needs the client to upload its buffers "
                    f"(settings.{name} has upload_buffers: false)"
                )
        baseline = self.report.baseline
        if baseline is not None:
            if baseline not in self.settings:
                raise ValueError(
                    f"report.baseline: {baseline!r} is not a setting, so nothing can be paired with it; "
                    f"params.yaml defines {', '.join(self.settings)} (null: a table without paired columns)"
                )
            if self._settings[baseline].client.label_repetition is not None:
                raise ValueError(
                    f"report.baseline: {baseline!r} repeats labels, so its batches pair with no other setting's"
                )
            self._check_budget(baseline, self.report.budget)
            base_client = self._settings[baseline].client
            if not any(
                pairs_with(self._settings[name].client, base_client)
                for name in self.settings
                if name not in (baseline, self.report.budget)
            ):
                raise ValueError(
                    f"report.baseline: no other setting pairs with {baseline!r} (the same batch size, no label "
                    "repetition), so the table has no verdict to make (null: a table without paired columns)"
                )
        elif self.report.budget is not None:
            raise ValueError("report.budget: needs report.baseline (the budget is measured against it)")
        if self.extract.trials < 2:
            raise ValueError(
                f"extract.trials: {self.extract.trials} client batch per cell leaves no spread between batches "
                "to test or to make an interval from (the batch is the unit): 2 or more"
            )
        if len(set(self.extract.epochs)) != len(self.extract.epochs):
            raise ValueError("extract.epochs: an epoch is listed twice")
        if len(set(self.extract.steps)) != len(self.extract.steps):
            raise ValueError("extract.steps: a step is listed twice")
        if not self.extract.epochs and not self.extract.steps:
            raise ValueError("extract: no checkpoint to upload from (extract.epochs and extract.steps are empty)")
        unwritten = [s for s in self.extract.steps if s not in self.train.checkpoint_steps]
        if unwritten:
            raise ValueError(
                f"extract.steps: step {unwritten[0]} is not one train writes (train.checkpoint_steps is "
                f"{self.train.checkpoint_steps})"
            )
        return self

    def _check_budget(self, baseline: str, budget: str | None) -> None:
        """The budget setting must be the baseline's client on its scheme, attacked with more
        iterations and nothing else changed."""
        if budget is None:
            return
        if budget not in self.settings:
            raise ValueError(
                f"report.budget: {budget!r} is not a setting; params.yaml defines {', '.join(self.settings)}"
            )
        mine, base = self._settings[budget], self._settings[baseline]
        ours, theirs = mine.attack.model_dump(), base.attack.model_dump()
        if (
            mine.scheme != base.scheme
            or mine.client != base.client
            or {k for k in ours if ours[k] != theirs[k]} != {"iterations"}
            or ours["iterations"] <= theirs["iterations"]
        ):
            raise ValueError(
                f"report.budget: {budget!r} must be {baseline!r}'s scheme and client attacked with more "
                "iterations and nothing else changed (settings.<name>.attack: {iterations: N})"
            )

    def _check_attack(self, a: AttackParams, where: str) -> None:
        if a.lr_min > a.lr:
            raise ValueError(f"{where}.lr_min: must not exceed attack.lr")
        if a.labels == "known" and not self.extract.reveal_labels:
            raise ValueError(f"{where}.labels: 'known' needs extract.reveal_labels: true")
        if a.compile and (a.bn_prior or a.split == "batch"):
            raise ValueError(f"{where}.compile: the compiled step takes neither bn_prior nor split: batch")
        if a.bn_statistics == "exact" and not self.extract.reveal_bn_statistics:
            raise ValueError(f"{where}.bn_statistics: 'exact' needs extract.reveal_bn_statistics: true")
        if a.combine == "mlco" and a.restarts < 2:
            raise ValueError(
                f"{where}.combine: 'mlco' combines restarts: it needs restarts: 2 or more (has {a.restarts})"
            )

    def _check_space(self, a: AttackParams, where: str) -> None:
        """Every value tune.space can give must make an attack params.yaml would accept."""
        space = self.tune.space
        for key, r in space.items():
            if key not in TUNABLE_NUMBERS + TUNABLE_CHOICES:
                raise ValueError(
                    f"tune.space: {key!r} is not a key the study can tune "
                    f"(numbers: {', '.join(TUNABLE_NUMBERS)}; choices: {', '.join(TUNABLE_CHOICES)})"
                )
            if (key in TUNABLE_CHOICES) != (r.choices is not None):
                raise ValueError(
                    f"tune.space.{key}: " + ("takes choices" if key in TUNABLE_CHOICES else "takes low and high")
                )
            if key == "iterations" and not (float(r.low or 0).is_integer() and float(r.high or 0).is_integer()):
                raise ValueError("tune.space.iterations: low and high must be whole numbers")
            values: list[Any] = list(r.choices) if r.choices is not None else [r.low, r.high]
            for value in values:
                value = int(value) if key == "iterations" else value
                self._check_attack(_changed(a, {key: value}, f"tune.space.{key}", ""), f"tune.space.{key} ({where})")
        if "lr" in space and "lr_min" in space and space["lr_min"].high > space["lr"].low:  # type: ignore[operator]
            raise ValueError("tune.space.lr_min: its high must not exceed lr's low (lr_min <= lr)")
        if self.tune.objective == "grad_loss" and {"objective", "layer_weights"} & set(space):
            raise ValueError(
                "tune.objective: grad_loss is not comparable across trials that change the attack's "
                "objective or layer_weights (use psnr)"
            )

    def _attack(self, name: str) -> AttackParams:
        overrides = self.settings[name].attack
        if not overrides:
            return self.attack
        return _changed(self.attack, overrides, f"settings.{name}.attack", "it changes keys of attack")

    def resolved(self, name: str) -> Setting:
        """A named setting as it runs (resolved and checked when the parameters were)."""
        if name not in self._settings:
            raise PipelineError(f"unknown setting {name!r}; params.yaml defines {', '.join(self.settings)}")
        return self._settings[name]

    def attack_for(self, name: str) -> AttackParams:
        """The attack parameters a named setting is attacked with: `attack`, changed by its own `attack:` keys."""
        return self.resolved(name).attack

    def _resolve(self, name: str) -> ClientParams:
        return _changed(
            self.client,
            dict(self.settings[name].model_extra or {}),
            f"settings.{name}",
            "a setting changes keys of client, and of attack under attack:",
        )

    def setting(self, name: str) -> tuple[str, ClientParams]:
        """The scheme a named setting uploads from and its complete client parameters."""
        s = self.resolved(name)
        return s.scheme, s.client

    def scheme(self, name: str) -> SchemeParams:
        if name not in self.schemes:
            raise PipelineError(f"unknown scheme {name!r}; params.yaml defines {', '.join(self.schemes)}")
        return self.schemes[name]


def _changed(section: _Section, overrides: dict[str, Any], where: str, about: str) -> Any:
    """`section` with `overrides` applied, validated; a bad key or value raises one ValueError
    naming `where`.<key> (`about`: what the overrides may change, for an unknown key)."""
    unknown = sorted(set(overrides) - set(type(section).model_fields))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} ({about})")
    try:
        return type(section).model_validate({**section.model_dump(), **overrides})
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        got = "" if first["type"] == "value_error" else f" (got {first['input']!r})"
        raise ValueError(
            f"{where}" + (f".{key}" if key else "") + f": {first['msg'].removeprefix('Value error, ')}{got}"
        ) from None


def _check_bottleneck_client(name: str, client: ClientParams, attack: AttackParams) -> None:
    """What a client of a PRECODE model (and its attackers) cannot do yet: each would upload, or
    be attacked, otherwise than the block's seeded draws and the adaptive attacker's model of it
    (the block and the classifier frozen, so left out of the match) assume."""
    refusals = [
        (client.defense is not None, "a client defense (its modelled transform would cover the matched tensors only)"),
        (client.local_steps > 1, "local_steps > 1 (the adaptive attacker would hold the frozen block at theta_0)"),
        (
            client.participants > 1 and client.participants_as == "processes",
            "participants_as: processes (not tested with a bottleneck)",
        ),
        (client.dp is not None and client.dp.kind == "per-sample", "per-sample DP (it leaves out the KL term)"),
        (attack.compile, "attack.compile (the compiled step leaves out the KL term)"),
        (attack.labels in ("llg", "idlg"), "labels llg or idlg (they assume ReLU features before the classifier)"),
    ]
    for refused, what in refusals:
        if refused:
            raise ValueError(f"settings.{name}: its scheme's bottleneck (PRECODE) does not take {what}")


def _check_name(section: str, name: str) -> None:
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ValueError(f"{section}: {name!r} is not a usable name (lower-case letters, digits, - and _)")


def one_line(err: ValidationError, source: str) -> str:
    """The first problem of a failed validation as one line about `source`."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}"
    if first["type"] == "missing":
        return f"{source}: missing key {key!r}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":  # our own checks; those across sections name their keys already
        return f"{source}: {key}: {message}" if first["loc"] else f"{source}: {message}"
    return f"{source}: {key}: {message} (got {first['input']!r})"


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed parameter mapping; a bad one raises PipelineError with one line."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of parameter sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise PipelineError(one_line(err, source)) from None


def load_params(path: str | Path) -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: parameter file not found") from None
    except yaml.YAMLError as err:
        raise PipelineError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_params(raw, str(path))
