"""ImageNet subset sampling (CSV), the shipped class index, and the sample CSV reader."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from datasets.sample_csv import read_sample_csv
from preprocessing import sample_imagenet_subset as sis

REPO = Path(__file__).resolve().parents[2]


def _fake_imagenet(root: Path, counts: dict[str, int]) -> Path:
    for synset, n in counts.items():
        d = root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / synset
        d.mkdir(parents=True)
        for i in range(n):
            (d / f"{synset}_{i}.JPEG").write_bytes(b"x")
        (d / "notes.txt").write_text("not an image")
    return root


def _class_json(path: Path, synsets: list[str]) -> Path:
    path.write_text(json.dumps({str(i): [s, f"name {i}"] for i, s in enumerate(synsets)}))
    return path


def test_sampling_is_uniform_deterministic_and_logs_skipped_classes(tmp_path, capsys):
    synsets = ["n001", "n002", "n003", "n004"]
    root = _fake_imagenet(tmp_path / "in", {"n001": 9, "n002": 5, "n003": 3})  # n004 has no folder
    classes = _class_json(tmp_path / "classes.json", synsets)
    args = ["--imagenet_root", str(root), "--per_class", "4", "--class_index_json", str(classes)]
    out_a = sis.main([*args, "--out", str(tmp_path / "a.csv"), "--seed", "1"])
    out_b = sis.main([*args, "--out", str(tmp_path / "b.csv"), "--seed", "1"])
    out_c = sis.main([*args, "--out", str(tmp_path / "c.csv"), "--seed", "2"])
    printed = capsys.readouterr().out
    assert out_a.read_text() == out_b.read_text()  # same seed, same CSV
    assert out_a.read_text() != out_c.read_text()  # n001 has 9 images: another seed picks others
    rows = list(csv.DictReader(open(out_a)))
    assert list(rows[0]) == ["id", "img_path", "class_id", "synset"]
    per_class = {}
    for r in rows:
        per_class.setdefault((r["synset"], r["class_id"]), []).append(r)
        assert Path(r["img_path"]).is_file() and Path(r["img_path"]).stem == r["id"]
    assert sorted(per_class) == [("n001", "0"), ("n002", "1")]
    assert all(len(v) == 4 for v in per_class.values())
    skipped = (tmp_path / "a.csv.skipped.txt").read_text()
    assert "n003" in skipped and "3 images < --per_class 4" in skipped
    assert "n004" in skipped and "missing" in skipped
    assert "skipped 2 classes" in printed
    # the picks of a class do not depend on the other classes
    _class_json(tmp_path / "one.json", ["n001"])
    only = sis.main(
        [
            "--imagenet_root",
            str(root),
            "--per_class",
            "4",
            "--class_index_json",
            str(tmp_path / "one.json"),
            "--out",
            str(tmp_path / "one.csv"),
            "--seed",
            "1",
        ]
    )
    assert [r["id"] for r in csv.DictReader(open(only))] == [r["id"] for r in rows if r["synset"] == "n001"]


def test_relative_paths_and_default_output_name(tmp_path, monkeypatch):
    root = _fake_imagenet(tmp_path / "in", {"n001": 2})
    classes = _class_json(tmp_path / "classes.json", ["n001"])
    monkeypatch.chdir(tmp_path)
    out = sis.main(
        [
            "--imagenet_root",
            str(root),
            "--per_class",
            "2",
            "--class_index_json",
            str(classes),
            "--relative_to",
            str(root),
        ]
    )
    assert out.name == "train_2.csv"
    rows = read_sample_csv(out)
    assert rows[0].img_path == "ILSVRC/Data/CLS-LOC/train/n001/n001_0.JPEG"


def test_no_usable_class_is_an_error(tmp_path):
    root = _fake_imagenet(tmp_path / "in", {"n001": 2})
    classes = _class_json(tmp_path / "classes.json", ["n001"])
    from utils.cli import UserError

    with pytest.raises(UserError, match="no class"):
        sis.main(
            [
                "--imagenet_root",
                str(root),
                "--per_class",
                "3",
                "--class_index_json",
                str(classes),
                "--out",
                str(tmp_path / "x.csv"),
            ]
        )


def test_tiny_imagenet_layout_is_found(tiny_assets, tmp_path):
    out = sis.main(
        [
            "--imagenet_root",
            str(tiny_assets["imagenet"]),
            "--per_class",
            "3",
            "--class_index_json",
            str(tiny_assets["imagenet_classes"]),
            "--out",
            str(tmp_path / "t.csv"),
        ]
    )
    rows = read_sample_csv(out)
    assert len(rows) == 3 * len(json.loads(Path(tiny_assets["imagenet_classes"]).read_text()))


def test_shipped_class_index_is_the_real_imagenet_1k_list():
    data = json.loads((REPO / "datasets" / "imagenet_classes.json").read_text())
    assert len(data) == 1000 and sorted(int(k) for k in data) == list(range(1000))
    assert data["0"] == ["n01440764", "tench"]
    assert data["1"][0] == "n01443537" and data["999"][0] == "n15075141"
    synsets = [data[str(i)][0] for i in range(1000)]
    assert len(set(synsets)) == 1000 and synsets == sorted(synsets)  # standard order = sorted synset ids
    assert all(s.startswith("n") and len(s) == 9 for s in synsets)
    assert sis.load_class_index(REPO / "datasets" / "imagenet_classes.json")[207] == (
        "n02099601",
        "Golden Retriever",
    )


def test_sample_csv_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,img_path,class_id,synset\na,x.jpg,0,n1\na,y.jpg,1,n2\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: duplicate id 'a'"):
        read_sample_csv(bad)
    bad.write_text("id,img_path,class_id,synset\na,x.jpg,zero,n1\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: class_id 'zero'"):
        read_sample_csv(bad)
    bad.write_text("id,path\na,x\n")
    with pytest.raises(ValueError, match=r"missing CSV columns \['img_path', 'class_id', 'synset'\]"):
        read_sample_csv(bad)
