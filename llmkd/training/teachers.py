"""The teachers of a config, checked before any weights load (no model library imported).

`model.teacher` (+ teacher_mode / teacher_server) is one teacher named `teacher`; `model.teachers`
names several, each a small section of the same keys plus `weight` (for `method.teacher_mix:
mean`) and `offload`. Also the teacher manifest a checkpoint records (names, kinds, model config
and tokenizer hashes), so resuming with another teacher set fails in one line.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmkd.validation import check_keys, coerce

MIXES = ("route", "mean")
MANIFEST = "llmkd_teachers.json"
# Keys of the batch's one sampling decision (where its responses come from, how they are sampled):
# a step samples once for all its rows, so these come from the shared `method` section only.
SHARED_METHOD_KEYS = ("lmbda", "seq_kd", "max_new_tokens", "gen_temperature", "top_p", "sampler", "vllm")


@dataclass
class TeacherSpec:
    """One named teacher: the `model.teacher*` keys of a single-teacher config, plus its weight."""

    teacher: str | None = None          # model dir / hub id / embedded (live; or an offline record)
    teacher_mode: str = "live"          # live | offline (top-k columns in this teacher's rows)
    teacher_server: str | None = None   # served: URL of `llmkd serve-teacher`
    teacher_topk: int = 20
    teacher_targets: str = "topk"       # served: topk | hidden (final hidden states + teacher_head)
    teacher_head: str | None = None
    teacher_dtype: str = "float32"
    teacher_timeout: float = 30.0       # served: seconds an attempt may take, plus ...
    teacher_timeout_per_token: float = 0.01   # ... this per token of the batch (then retries)
    teacher_wait: float = 0.0           # served: seconds to wait at start-up for a server still loading
    weight: float = 1.0                 # teacher_mix=mean: its share of the mixture
    offload: str | None = None          # cpu: kept in host memory, on the device only for its rows
    method: dict | None = None          # this teacher's method keys over the method section (e.g.
                                        # {name: cross_tokenizer} for a teacher of another tokenizer)

    @property
    def kind(self) -> str:
        return "served" if self.teacher_server else self.teacher_mode


def teacher_specs(model: Any) -> dict[str, TeacherSpec]:
    """name -> TeacherSpec; the single-teacher keys are the one teacher named `teacher`."""
    if not model.teachers:
        return {"teacher": TeacherSpec(**{f.name: getattr(model, f.name) for f in dataclasses.fields(TeacherSpec)
                                          if hasattr(model, f.name)})}   # the model.teacher* keys
    if not isinstance(model.teachers, dict):
        raise ValueError(f"config: model.teachers must map names to teachers, found {model.teachers!r}; "
                         "e.g. {math: {teacher: DIR}, chat: {teacher_server: http://host:8000}}")
    out = {}
    for name, raw in model.teachers.items():
        where = f"model.teachers.{name}."
        if not isinstance(raw, dict):
            raise ValueError(f"config: {where[:-1]} must be a mapping, e.g. {{teacher: DIR}}; found {raw!r}")
        check_keys(where, raw, [f.name for f in dataclasses.fields(TeacherSpec)])
        out[str(name)] = TeacherSpec(**coerce(where, raw, TeacherSpec))
    return out


def teacher_method(method: Any, spec: TeacherSpec) -> tuple[str, dict[str, Any]]:
    """(method name, params) for one teacher: the method section, with the teacher's own `method`
    keys on top; another method name starts from that method's defaults plus the shared sampling
    keys it knows (SHARED_METHOD_KEYS), so every teacher's instance samples alike."""
    from llmkd.methods import get_params

    own = dict(spec.method or {})
    name = own.pop("name", method.name)
    if name == method.name:
        return name, {**method.params, **own}
    fields = {f.name for f in dataclasses.fields(get_params(name))}
    return name, {**{k: v for k, v in method.params.items() if k in SHARED_METHOD_KEYS and k in fields}, **own}


def check_teachers(model: Any, data: Any, method: Any, params: Any) -> None:
    """Every teacher-set rule, one line each: kinds the method can use, names the mixture routes
    to, weights, `mean`'s shared tokenizer, the derived student's teacher."""
    from llmkd.data.mixture import generated_teachers, sources
    from llmkd.teachers import check_teacher_kind

    mix = method.teacher_mix
    if mix not in MIXES:
        raise ValueError(f"config: method.teacher_mix={mix!r} is unknown; use route (each row to its "
                         "source's teacher) or mean (the weighted average of the teachers)")
    if not model.teachers:
        check_teacher_kind(params, teacher_specs(model)["teacher"].kind)
        if data.mixture and any(t not in (None, "teacher") for t, _ in sources(data)):
            raise ValueError("config: data.mixture names teachers but model.teachers is not set; name "
                             "them in model.teachers, or drop the sources' teacher keys")
        several = next((src.path for _, src in sources(data) if generated_teachers(src.path)), None)
        if several:
            raise ValueError(f"config: data path {several!r} holds rows of teachers "
                             f"{', '.join(generated_teachers(several))}; name them in model.teachers "
                             "(e.g. {NAME: {teacher_mode: offline}}) to route each row to its teacher")
        return
    if model.teacher is not None or model.teacher_server:
        raise ValueError("config: model.teacher / model.teacher_server and model.teachers are both set; "
                         "give one teacher as model.teacher, or all of them under model.teachers")
    specs = teacher_specs(model)
    for name, spec in specs.items():
        _check_spec(name, spec)
        check_teacher_kind(_own_params(method, spec, name), spec.kind, name)
    weights = [s.weight for s in specs.values()]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"config: model.teachers weights {dict(zip(specs, weights))} must be >= 0 with a "
                         "positive sum (they are normalised to shares of the mixture)")
    if len(specs) > 1 and getattr(params, "seq_kd", False):
        raise ValueError("config: method.seq_kd with several teachers is not supported (whose samples?); "
                         "use method.lmbda (student samples, each scored by its source's teacher)")
    names = list(specs)
    used = set()
    for i, (teacher, src) in enumerate(sources(data)):
        where = f"data.mixture[{i}].teacher" if data.mixture else "data"
        inside = generated_teachers(src.path)
        if inside:          # a generated dir of several teachers: its rows name their teachers
            if teacher is not None and teacher not in inside:
                raise ValueError(f"config: {where}={teacher!r} has no rows in {src.path!r} (its teachers: "
                                 f"{', '.join(inside)}); name one of them, or drop the key to take all")
            for name in [teacher] if teacher is not None else inside:
                if name not in specs:
                    raise ValueError(f"config: {src.path!r} holds rows of teacher {name!r}, which is not in "
                                     f"model.teachers ({', '.join(names)}); add it (e.g. {{teacher_mode: "
                                     "offline}), or take other teachers' rows with data.mixture[].teacher")
                used.add(name)
            continue
        if teacher is None:
            if mix == "route" and len(names) > 1:
                raise ValueError(f"config: {where} is missing: with several teachers and teacher_mix=route "
                                 f"each source names its teacher (one of {', '.join(names)})")
            continue
        if teacher not in specs:
            near = difflib.get_close_matches(teacher, names, n=1)
            raise ValueError(f"config: {where}={teacher!r} is not in model.teachers"
                             + (f"; did you mean {near[0]!r}?" if near else "") + f" (teachers: {', '.join(names)})")
        used.add(teacher)
        if specs[teacher].kind == "offline" and not src.path:
            raise ValueError(f"config: {where}={teacher!r} is offline: its source needs a path to an "
                             "`llmkd generate` output (the top-k columns)")
    unused = [n for n in names if n not in used]
    if mix == "route" and unused and (data.mixture or len(names) > 1):
        raise ValueError(f"config: model.teachers.{unused[0]} is used by no source of data.mixture; route "
                         "a source to it (teacher: NAME) or remove it")
    if mix == "mean":
        not_live = [n for n, s in specs.items() if s.kind != "live"]
        if not_live:
            raise ValueError(f"config: method.teacher_mix=mean averages full distributions: model.teachers."
                             f"{not_live[0]} is {specs[not_live[0]].kind}; use live teachers, or teacher_mix=route")
        toks = {n: tokenizer_hash(s.teacher) for n, s in specs.items()}
        if len(set(toks.values())) > 1:
            a, b = list(toks)[0], next(n for n in toks if toks[n] != toks[list(toks)[0]])
            raise ValueError(f"config: method.teacher_mix=mean needs one tokenizer, but model.teachers.{a} and "
                             f"model.teachers.{b} tokenize differently; use teacher_mix=route (a different "
                             "tokenizer is distilled through method.name=cross_tokenizer)")
    if model.student is None:
        if model.student_from not in specs or specs[model.student_from].kind != "live":
            raise ValueError(f"config: model.student is missing and model.student_from={model.student_from!r} "
                             f"names no live teacher; set model.student, or student_from: one of "
                             f"{', '.join(n for n, s in specs.items() if s.kind == 'live')}")


def _own_params(method: Any, spec: TeacherSpec, name: str) -> Any:
    """The teacher's method Params (its `method` keys over the method section), validated."""
    from llmkd.methods import get_params

    if spec.method is not None and not isinstance(spec.method, dict):
        raise ValueError(f"config: model.teachers.{name}.method must be a mapping of method keys, e.g. "
                         f"{{name: cross_tokenizer, loss: alm}}; found {spec.method!r}")
    shared = [k for k in (spec.method or {}) if k in SHARED_METHOD_KEYS]
    if shared:
        raise ValueError(f"config: model.teachers.{name}.method.{shared[0]} is not per teacher: a step samples "
                         f"once for all its rows; set {shared[0]} in the shared method section")
    if spec.method and method.teacher_mix == "mean":
        raise ValueError(f"config: model.teachers.{name}.method with teacher_mix=mean: one loss scores the "
                         "mixture; set method keys in the shared method section (or use teacher_mix=route)")
    own, raw = teacher_method(method, spec)
    try:
        return get_params(own).from_dict(raw)
    except ValueError as err:
        raise ValueError(str(err).replace("method.", f"model.teachers.{name}.method.")) from None


def check_served_targets(where: str, m: Any) -> None:
    """`teacher_targets` / `teacher_head` (of model, or of one of model.teachers) name what a
    served teacher returns; without a server they are a mistake, said in one line."""
    if m.teacher_server:
        from llmkd.teacher_server import check_teacher_server

        try:
            check_teacher_server(m.teacher_server, m.teacher_topk, m.teacher_targets, m.teacher_head)
        except ValueError as err:
            raise ValueError(str(err).replace("model.", where)) from None
    elif m.teacher_targets != "topk" or m.teacher_head:
        raise ValueError(f"config: {where}teacher_targets / {where}teacher_head apply to a served teacher "
                         f"({where}teacher_server); stored hidden states come from an `llmkd generate` "
                         "dir written with targets=hidden (teacher_mode: offline)")


def _check_spec(name: str, spec: TeacherSpec) -> None:
    where = f"config: model.teachers.{name}"
    if spec.teacher_mode not in ("live", "offline"):
        raise ValueError(f"{where}.teacher_mode={spec.teacher_mode!r}; use 'live' or 'offline'")
    if spec.kind == "live" and spec.teacher is None:
        raise ValueError(f"{where}.teacher is missing; give a model dir or 'embedded' (or teacher_server: "
                         "URL, or teacher_mode: offline)")
    check_served_targets(f"model.teachers.{name}.", spec)
    if spec.teacher_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"{where}.teacher_dtype={spec.teacher_dtype!r}; use float32, bfloat16 or float16")
    if spec.offload not in (None, "cpu"):
        raise ValueError(f"{where}.offload={spec.offload!r}; use cpu (kept off the device) or leave it unset")
    if spec.kind == "live" and spec.teacher != "embedded" and not Path(spec.teacher).expanduser().exists():
        raise ValueError(f"{where}.teacher={spec.teacher!r} is not a model directory; give a local "
                         "directory with config.json + safetensors, or 'embedded'")
    if spec.kind == "live" and spec.teacher != "embedded":
        from llmkd.preflight import check_model_dir

        check_model_dir(spec.teacher, f"model.teachers.{name}.teacher")


# --- the manifest a checkpoint records -----------------------------------------------------------
def _local_dir(name: str | None) -> Path | None:
    if name is None:
        return None
    if name == "embedded":
        from llmkd.models.embedded import EMBEDDED_NAME, cache_root

        d = cache_root() / "models" / EMBEDDED_NAME
        return d if d.is_dir() else None
    p = Path(name).expanduser()
    return p if p.is_dir() else None


def _file_hash(path: Path, pick: Any = None) -> str | None:
    if not path.is_file():
        return None
    data = path.read_bytes()
    if pick is not None:
        try:
            data = json.dumps(pick(json.loads(data)), sort_keys=True).encode()
        except (ValueError, KeyError, TypeError):
            pass
    return hashlib.sha256(data).hexdigest()[:16]


def tokenizer_hash(name: str | None) -> str | None:
    """A hash of the tokenizer's vocabulary (tokenizer.json's model + added tokens, else vocab.json)."""
    d = _local_dir(name)
    if d is None:
        return name
    return (_file_hash(d / "tokenizer.json", lambda j: [j["model"], j.get("added_tokens")])
            or _file_hash(d / "vocab.json") or str(d))


def teacher_manifest(model: Any) -> dict[str, dict[str, Any]]:
    """name -> {kind, model (dir / URL), config and tokenizer hashes; a served teacher's targets
    (top-k, or hidden states + a hash of the head file)}: what a checkpoint was trained on."""
    out = {}
    for name, s in teacher_specs(model).items():
        d = _local_dir(s.teacher)
        out[name] = {"kind": s.kind, "model": s.teacher_server or s.teacher,
                     "config": _file_hash(d / "config.json") if d else None,
                     "tokenizer": tokenizer_hash(s.teacher)}
        if s.kind == "served":   # top-k + tail and full-vocabulary targets train different students
            hidden = s.teacher_targets == "hidden"
            out[name] |= {"targets": "hidden" if hidden else f"top-{s.teacher_topk}",
                          "head": _file_hash(Path(s.teacher_head).expanduser()) if hidden and s.teacher_head
                          else None}
    return out


def check_resume_teachers(checkpoint: str | Path | None, model: Any) -> None:
    """Resuming with a changed teacher set is an error naming the change (checkpoints written
    before manifests existed pass)."""
    if checkpoint is None or not (Path(checkpoint) / MANIFEST).is_file():
        return
    saved = json.loads((Path(checkpoint) / MANIFEST).read_text())
    now = teacher_manifest(model)
    changes = ([f"{n} removed" for n in saved if n not in now] + [f"{n} added" for n in now if n not in saved]
               + [f"{n}.{k} {saved[n][k]!r} -> {v!r}" for n in now if n in saved
                  for k, v in now[n].items() if k in saved[n] and saved[n][k] != v])   # keys it recorded
    if changes:
        raise ValueError(f"config: resume_from_checkpoint={str(checkpoint)!r} was trained with another teacher "
                         f"set ({'; '.join(changes)}); resume with the checkpoint's teachers, or start a new run")
