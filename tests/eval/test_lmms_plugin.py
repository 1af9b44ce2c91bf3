"""The lmms-eval plugin (`--model linmu`): the same class for LinMU models and teachers, generate_until and
loglikelihood over images and videos, and a local task run through the real `lmms-eval` command line, offline.

Skipped when lmms-eval is not installed (CPU install: `pip install --no-deps lmms-eval==0.7.3` plus
`loguru pytz evaluate tenacity sacrebleu pytablewriter`)."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("lmms_eval")
pytest.importorskip("loguru")

from linmu.inference.generate import InputError, generate  # noqa: E402
from tests.helpers import write_tiny_workspace  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms")
    write_tiny_workspace(root, seed=7, students=("student",), media_seed=2)
    docs = [dict(image=str(root / "a.png"), video=None, question="what color is the shape", answer="red",
                 choices=["red", "green", "blue"], label=0),
            dict(image=None, video=str(root / "clip.mp4"), question="how many times did it blink", answer="two",
                 choices=["one", "two", "three"], label=1),
            dict(image=str(root / "a.png"), video=str(root / "clip.mp4"), question="what shape", answer="circle",
                 choices=["square", "circle"], label=1)]
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return root, docs


def _visual(doc):
    out = [Image.open(doc["image"]).convert("RGB")] if doc.get("image") else []
    return out + ([doc["video"]] if doc.get("video") else [])


def _instance(kind, args):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=kind, arguments=args, idx=0,
                    metadata={"task": args[-2], "doc_id": args[-3], "repeats": 1})


def _plugin(ws, **kw):
    from linmu.eval.lmms_plugin import LinMULmms

    root, docs = ws
    lm = LinMULmms(device="cpu", num_frames="4", **kw)
    lm.task_dict = {"t": {"test": docs}}
    return lm


def test_manifest_registers_the_class():
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from linmu.eval.lmms_plugin import MANIFEST, LinMULmms

    reg = ModelRegistryV2()
    reg.register_manifest(MANIFEST)
    assert reg.get_model_class("linmu") is LinMULmms and LinMULmms.is_simple
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["lmms_eval.models"]["linmu"] == "linmu.eval.lmms_plugin:MANIFEST"
    # lmms-eval itself installs with --no-deps (its pins are heavy); the extra holds what its CLI needs
    assert {"loguru", "evaluate", "sacrebleu"} <= set(project["optional-dependencies"]["eval"])


def test_teacher_and_student_generate_until(ws):
    root, docs = ws
    teacher = _plugin(ws, pretrained=str(root / "teacher"))
    student = _plugin(ws, pretrained=str(root / "student"), processor=str(root / "teacher"), batch_size="2")
    assert (teacher.kind, student.kind) == ("teacher", "linmu")
    gen = {"max_new_tokens": 5, "until": ["\n\n"], "temperature": 0, "image_aspect_ratio": "original"}
    reqs = [_instance("generate_until", (d["question"], dict(gen), _visual, i, "t", "test")) for i, d in
            enumerate(docs)]
    for plugin, kind in ((teacher, "teacher"), (student, "student")):
        answers = plugin.generate_until(reqs)
        assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
        # the same answers as linmu.inference.generate on each prompt alone (the student's came in a padded batch)
        for d, a in zip(docs, answers):
            ref = generate(plugin.lm, d["question"], images=[d["image"]] if d["image"] else [], video=d["video"],
                           num_frames=4, max_new_tokens=5)
            assert a == ref.text.split("\n\n")[0].strip(), (kind, d["question"])


def test_loglikelihood_matches_step_by_step_scoring(ws):
    root, docs = ws
    lm = _plugin(ws, pretrained=str(root / "teacher"))
    tok, model = lm.tokenizer, lm.model
    from linmu.inference.generate import build_inputs, load_media, to_model_inputs

    doc = docs[2]  # an image and a video
    media = load_media([doc["image"]], [doc["video"]], num_frames=4)
    inputs = to_model_inputs(build_inputs(lm.lm, doc["question"], media), model)

    def step_by_step(words):
        ids = tok(words, add_special_tokens=False)["input_ids"]
        total, greedy, cur = 0.0, True, dict(inputs)
        for t in ids:
            with torch.no_grad():
                logp = torch.log_softmax(model(**cur, use_cache=False).logits[0, -1].float(), -1)
            total += float(logp[t])
            greedy &= int(logp.argmax()) == t
            cur["input_ids"] = torch.cat([cur["input_ids"], torch.tensor([[t]])], 1)
            cur["attention_mask"] = torch.ones_like(cur["input_ids"])
            cur["mm_token_type_ids"] = torch.cat([cur["mm_token_type_ids"], torch.zeros(1, 1, dtype=torch.long)], 1)
        return total, greedy

    with torch.no_grad():
        first = int(model(**inputs, use_cache=False).logits[0, -1].argmax())
    greedy_word = tok.decode([first])
    conts = [" red", " blue circle", greedy_word]
    reqs = [_instance("loglikelihood", (doc["question"], c, _visual, 2, "t", "test")) for c in conts]
    got = lm.loglikelihood(reqs)  # lmms-eval's convention: -log p, lower is better
    logprob = _plugin(ws, pretrained=str(root / "teacher"), ll_convention="logprob")
    logprob.task_dict = lm.task_dict
    got_lp = logprob.loglikelihood(reqs)
    for c, (nll, is_greedy), (lp, g2) in zip(conts, got, got_lp):
        ref_ll, ref_greedy = step_by_step(c.lstrip())
        assert lp == pytest.approx(ref_ll, abs=1e-4) and lp < 0 and nll == -lp, c
        assert is_greedy == ref_greedy == g2, c
    assert got[2][1] is True  # the model's own next token is the greedy continuation


def test_kind_options_and_bad_media(ws, tmp_path):
    root, docs = ws
    with pytest.raises(InputError, match="is a LinMU model, not a teacher"):
        _plugin(ws, pretrained=str(root / "student"), processor=str(root / "teacher"), teacher="true")
    with pytest.raises(InputError, match="teacher checkpoint, not a LinMU model"):
        _plugin(ws, pretrained=str(root / "teacher"), teacher="false")
    with pytest.raises(ValueError, match="unknown model_args"):
        _plugin(ws, pretrained=str(root / "teacher"), frames=3)
    lm = _plugin(ws, pretrained=str(root / "teacher"), teacher="true")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    lm.task_dict = {"t": {"test": [dict(docs[1], video=str(bad))]}}
    req = _instance("generate_until", ("what", {"max_new_tokens": 2}, _visual, 0, "t", "test"))
    assert lm.generate_until([req]) == [""] and lm.failed_requests == 1  # logged and scored wrong
    strict = _plugin(ws, pretrained=str(root / "teacher"), strict="true")
    strict.task_dict = lm.task_dict
    from linmu.data import MediaError

    with pytest.raises(MediaError, match="corrupt"):
        strict.generate_until([req])


TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    out = [Image.open(doc["image"]).convert("RGB")] if doc.get("image") else []
    return out + ([doc["video"]] if doc.get("video") else [])


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_choice(doc):
    return doc["choices"]
'''


def _task_yaml(name, data, output_type, extra):
    return textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: {output_type}
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        """) + textwrap.dedent(extra)


def _cli_env(tmp_path):
    """Environment for the lmms-eval subprocess: offline, caches in tmp, linmu importable. lmms-eval finds the
    plugin through linmu's entry point; where the installed metadata predates it (a stale editable install), through
    the LMMS_EVAL_PLUGINS route with a two-file shim package instead."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"), "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    probe = ("import importlib.util, sys; from importlib.metadata import entry_points; "
             "ok = importlib.util.find_spec('linmu') is not None; "
             "ep = any(e.name == 'linmu' for e in entry_points(group='lmms_eval.models')); "
             "print(int(ok), int(ep))")
    ok, ep = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            check=True).stdout.split()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if ok == "0":
        paths.append(str(REPO))
    if ep == "0":
        shim = tmp_path / "shim" / "linmu_lmms_shim"
        (shim / "models").mkdir(parents=True)
        (shim / "tasks").mkdir()
        (shim / "__init__.py").write_text("")
        (shim / "tasks" / "__init__.py").write_text("")
        (shim / "models" / "__init__.py").write_text('AVAILABLE_MODELS = {"linmu": "LinMULmms"}\n')
        (shim / "models" / "linmu.py").write_text("from linmu.eval.lmms_plugin import LinMULmms  # noqa: F401\n")
        paths.append(str(tmp_path / "shim"))
        env["LMMS_EVAL_PLUGINS"] = "linmu_lmms_shim"
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env, "entry point" if ep == "1" else "LMMS_EVAL_PLUGINS"


def test_lmms_eval_command_line_on_a_local_task(ws, tmp_path):
    """`lmms-eval --model linmu` on two local tasks (generation with exact match; multiple choice scored by
    loglikelihood), images and a video, offline; the logged answers and scores equal the plugin's own."""
    root, docs = ws
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    data = root / "docs.jsonl"
    (tasks / "gen.yaml").write_text(_task_yaml("linmu_tiny_gen", data, "generate_until", """\
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 4
          until: ["\\n\\n"]
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        """))
    (tasks / "mc.yaml").write_text(_task_yaml("linmu_tiny_mc", data, "multiple_choice", """\
        doc_to_target: label
        doc_to_choice: !function utils.doc_to_choice
        metric_list:
          - metric: acc
            aggregation: mean
            higher_is_better: true
        """))
    env, route = _cli_env(tmp_path)
    model_args = f"pretrained={root / 'student'},processor={root / 'teacher'},num_frames=4,device=cpu"
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "linmu", "--model_args", model_args, "--tasks",
           "linmu_tiny_gen,linmu_tiny_mc", "--include_path", str(tasks), "--batch_size", "1", "--output_path",
           str(tmp_path / "out"), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"[{route}] {proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "linmu_tiny_gen" in proc.stdout and "linmu_tiny_mc" in proc.stdout  # the results table
    results = json.loads(Path(glob.glob(str(tmp_path / "out" / "**" / "*_results.json"), recursive=True)[0])
                         .read_text())
    assert 0 <= results["results"]["linmu_tiny_gen"]["exact_match,none"] <= 1
    acc = results["results"]["linmu_tiny_mc"]["acc,none"]

    def samples(task):
        f = glob.glob(str(tmp_path / "out" / "**" / f"*_samples_{task}.jsonl"), recursive=True)[0]
        return sorted((json.loads(l) for l in Path(f).read_text().splitlines()), key=lambda s: s["doc_id"])

    # the same answers and choice scores from the plugin in this process
    plugin = _plugin(ws, pretrained=str(root / "student"), processor=str(root / "teacher"))
    gen_reqs = [_instance("generate_until", (d["question"], {"max_new_tokens": 4, "until": ["\n\n"]}, _visual, i,
                                             "t", "test")) for i, d in enumerate(docs)]
    assert [s["filtered_resps"] for s in samples("linmu_tiny_gen")] == plugin.generate_until(gen_reqs)
    right = 0
    for s, d in zip(samples("linmu_tiny_mc"), docs):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        mine = plugin.loglikelihood([_instance("loglikelihood", (d["question"], " " + c, _visual, s["doc_id"], "t",
                                                                  "test")) for c in d["choices"]])
        assert lls == pytest.approx([m[0] for m in mine], abs=1e-4)
        right += int(np.argmin(lls) == d["label"])  # lmms-eval picks the lowest score: the most likely choice
    assert acc == pytest.approx(right / len(docs))
