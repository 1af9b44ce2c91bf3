import json

from linmu.data import load_conversations
from linmu.data.conversations import normalize_placeholders


def _write_json(path, records):
    path.write_text(json.dumps(records, indent=1))
    return path


def test_json_list_images_roles_and_paths(tmp_path):
    recs = [
        {"id": "one", "image": "a.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "a circle"}]},
        {"id": 7, "image": ["a.jpg", "sub/b.jpg"],
         "conversations": [{"from": "user", "value": "<image> and <image>: same?"},
                           {"from": "assistant", "value": "no"}, {"from": "human", "value": "why"},
                           {"from": "gpt", "value": "colors"}]},
        {"id": "sys", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "hi"},
                                        {"from": "gpt", "value": "hello"}]},
    ]
    p = _write_json(tmp_path / "data.json", recs)
    s = load_conversations(p)
    assert [x.id for x in s] == ["one", "7", "sys"]
    assert all(x.error is None for x in s)
    assert s[0].turns == [("user", "<image>\nWhat shape?"), ("assistant", "a circle")]
    assert s[0].images == [str(tmp_path / "a.jpg")] and s[0].video is None
    assert s[0].source == "data.json:1" and s[2].source == "data.json:3"
    assert s[1].images == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.jpg")]
    assert [r for r, _ in s[1].turns] == ["user", "assistant", "user", "assistant"]
    assert s[2].turns[0] == ("system", "be brief") and s[2].images == []
    # media_root overrides the JSON's folder
    s2 = load_conversations(p, media_root="/data/media")
    assert s2[0].images == ["/data/media/a.jpg"]


def test_jsonl_video_placeholders_and_malformed_lines(tmp_path):
    lines = [
        json.dumps({"id": "v1", "video": "clips/v1.mp4",
                    "conversations": [{"from": "human", "value": "<video>\nHow many?"},
                                      {"from": "gpt", "value": "3"}]}),
        "",  # blank lines are ignored
        json.dumps({"id": "v2", "video": "/abs/v2.mp4",  # LLaVA-Video-178K uses <image> for the video
                    "conversations": [{"from": "human", "value": "<image>\nWhat first?"},
                                      {"from": "gpt", "value": "red"}]}),
        json.dumps({"id": "v3", "video": "v3.mp4",  # no placeholder: put before the first human text
                    "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "ok"}]}),
        json.dumps({"id": "i4", "image": ["x.png", "y.png"],
                    "conversations": [{"from": "gpt", "value": "hm"}, {"from": "human", "value": "Compare."},
                                      {"from": "gpt", "value": "same"}]}),
        '{"id": "broken", "conversations": [',  # malformed JSON
        json.dumps({"id": "badrole", "conversations": [{"from": "robot", "value": "x"}]}),
        json.dumps({"id": "mismatch", "image": "a.png",
                    "conversations": [{"from": "human", "value": "<image><image> two?"},
                                      {"from": "gpt", "value": "no"}]}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "noconv"}),
    ]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    s = {x.id: x for x in load_conversations(p)}
    assert s["v1"].video == str(tmp_path / "clips/v1.mp4") and s["v1"].error is None and s["v1"].source == "d.jsonl:1"
    assert s["v2"].video == "/abs/v2.mp4" and s["v2"].turns[0][1] == "<video>\nWhat first?" and s["v2"].error is None
    assert s["v2"].source == "d.jsonl:3"
    assert s["v3"].turns[0] == ("user", "<video>\nDescribe.")
    assert s["i4"].turns[1] == ("user", "<image>\n<image>\nCompare.") and s["i4"].turns[0] == ("assistant", "hm")
    bad = s["d.jsonl:6"]
    assert bad.error == "malformed" and bad.source == "d.jsonl:6" and "invalid JSON" in bad.detail
    assert s["badrole"].error == "malformed" and "robot" in s["badrole"].detail
    assert s["mismatch"].error == "media_mismatch"
    assert s["d.jsonl:9"].error == "malformed"
    assert s["noconv"].error == "malformed"
    assert len(s) == 9  # the blank line is not a sample


def test_broken_json_list_is_one_bad_sample(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[{"id": 1, "conversations": []},\n {"id": 2,')
    s = load_conversations(p)
    assert len(s) == 1 and s[0].error == "malformed"


def test_normalize_placeholders_rules():
    turns, err = normalize_placeholders([("user", "q"), ("assistant", "a")], 2, 1)
    assert err is None and turns[0] == ("user", "<image>\n<image>\n<video>\nq")
    _, err = normalize_placeholders([("assistant", "a")], 1, 0)
    assert err  # media but no user turn
