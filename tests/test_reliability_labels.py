"""Issue 14 item 1: a labels CSV is matched to the cached images without guessing; conflicts, ambiguous bare names,
rows matching nothing, stale CSVs (another root) are refused naming the rows; the report says how rows matched."""

from __future__ import annotations

import pytest

from fastcbm.data.labels import csv_labels, folder_labels, match_csv_labels


def _files(root, classes=("cat", "dog"), n=3):
    return [str(root / "data" / c / f"{i:04d}.png") for c in classes for i in range(n)]


def test_paths_relative_absolute_and_unique_bare_names(tmp_path):
    files = _files(tmp_path) + [str(tmp_path / "data" / "solo" / "unique.png")]
    rows = ["file,class"]
    rows += [f"data/cat/{i:04d}.png,cat" for i in range(3)]  # relative to the CSV's folder
    rows += [f"{tmp_path}/data/dog/{i:04d}.png,dog" for i in range(3)]  # absolute
    rows += ["unique.png,bird", "data/cat/0000.png,cat"]  # a unique bare name; a duplicate row with the same class
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    res = match_csv_labels(tmp_path / "l.csv", files)
    y, names = res  # unpacks like the old (labels, names)
    assert names == ["cat", "dog", "bird"] and y.tolist() == [0, 0, 0, 1, 1, 1, 2]
    rep = res.report
    assert rep["matched_by"] == {"path": 7, "name": 1} and rep["duplicate_rows_same_class"] == 1
    assert {"line": 8, "path": "unique.png", "how": "name", "image": files[-1]} in rep["row_matches"]
    assert csv_labels(tmp_path / "l.csv", files).report == rep
    assert folder_labels(files).report["source"] == "folders"


def test_bare_names_without_extension_match_a_unique_stem(tmp_path):
    """DEAL's mask folders list 'name,class' rows with the image's stem; a stem two images share is refused."""
    files = [str(tmp_path / "images" / f"{n}.jpg") for n in ("a", "b")] + [str(tmp_path / "images" / "b.png")]
    (tmp_path / "labels.csv").write_text("name,class\na,cat\n")
    with pytest.raises(ValueError, match="no label for"):
        match_csv_labels(tmp_path / "labels.csv", files)
    (tmp_path / "labels.csv").write_text("name,class\na,cat\nb,dog\n")
    with pytest.raises(ValueError, match=r"line 3 'b' matches 2 images"):
        match_csv_labels(tmp_path / "labels.csv", files)
    y, names = match_csv_labels(tmp_path / "labels.csv", files[:2])
    assert names == ["cat", "dog"] and y.tolist() == [0, 1]


def test_stale_csv_with_shared_file_names_is_refused(tmp_path):
    """The issue's case: two classes both named 0000.png…, the CSV written for a folder that no longer exists. The
    old bare-name fallback labelled every image of one class as the other and trained with exit 0."""
    files = _files(tmp_path)
    rows = [f"/old/place/{c}/{i:04d}.png,{c}" for c in ("cat", "dog") for i in range(3)]
    (tmp_path / "stale.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError) as ei:
        match_csv_labels(tmp_path / "stale.csv", files)
    msg = str(ei.value)
    assert "\n" not in msg and "no label for" in msg and "6 of its 6 rows match no image" in msg
    assert "/old/place" in msg and "line 1" in msg


def test_ambiguous_bare_names_are_refused(tmp_path):
    files = _files(tmp_path)
    (tmp_path / "bare.csv").write_text("".join(f"{i:04d}.png,x\n" for i in range(3)))
    with pytest.raises(ValueError, match=r"bare file name\(s\) match several images.*line 1 '0000.png' matches 2"):
        match_csv_labels(tmp_path / "bare.csv", files)


def test_conflicting_duplicate_rows_are_refused(tmp_path):
    files = _files(tmp_path, n=1)
    (tmp_path / "c.csv").write_text("data/cat/0000.png,cat\ndata/dog/0000.png,dog\ndata/cat/0000.png,dog\n")
    with pytest.raises(ValueError, match=r"two classes: .*cat/0000.png: line 1 says 'cat', line 3 says 'dog'"):
        match_csv_labels(tmp_path / "c.csv", files)


def test_rows_matching_nothing_are_refused(tmp_path):
    files = _files(tmp_path, n=1)
    (tmp_path / "x.csv").write_text("data/cat/0000.png,cat\ndata/dog/0000.png,dog\ndata/cow/0009.png,cow\n")
    with pytest.raises(ValueError, match=r"1 of its 3 rows match no image .*line 3 'data/cow/0009.png'"):
        match_csv_labels(tmp_path / "x.csv", files)


def test_csv_under_an_unknown_root_is_refused_even_with_unique_names(tmp_path):
    files = [str(tmp_path / "data" / "cat" / "a.png"), str(tmp_path / "data" / "dog" / "b.png")]
    (tmp_path / "u.csv").write_text("elsewhere/cat/a.png,cat\nelsewhere/dog/b.png,dog\n")
    with pytest.raises(ValueError, match="resolved under .*elsewhere"):
        match_csv_labels(tmp_path / "u.csv", files)


def test_symlinked_folder_matches_by_resolved_path(tmp_path):
    (tmp_path / "real" / "cat").mkdir(parents=True)
    (tmp_path / "real" / "cat" / "a.png").write_bytes(b"")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "s.csv").write_text("real/cat/a.png,cat\n")
    res = match_csv_labels(tmp_path / "s.csv", [str(tmp_path / "link" / "cat" / "a.png")])
    assert res.report["matched_by"] == {"path (symlinks resolved)": 1}


@pytest.mark.parametrize("content,match", [("", "is empty"), ("a.png\n", "expected 'path,class'"),
                                           (b"\xff\xfe\x00bad", "not a UTF-8")])
def test_malformed_csv_is_one_line(tmp_path, content, match):
    f = tmp_path / "m.csv"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=match) as ei:
        match_csv_labels(f, [str(tmp_path / "a.png")])
    assert "\n" not in str(ei.value)
    with pytest.raises(FileNotFoundError, match="is a directory"):
        match_csv_labels(tmp_path, [])


def test_train_checks_out_first_and_reports_label_matching(tmp_path):
    from fastcbm.salf.train import _labels_for, train_salf_from_cache

    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="out: .* is an existing file"):  # before any cache is even opened
        train_salf_from_cache(tmp_path / "no-cache", [], tmp_path / "file")

    class Reader:
        files = _files(tmp_path, n=1)

        def __len__(self):
            return len(self.files)

    (tmp_path / "l.csv").write_text("data/cat/0000.png,cat\ndata/dog/0000.png,dog\n")
    assert _labels_for(Reader(), tmp_path / "l.csv", None).report["matched_by"] == {"path": 2}
    assert _labels_for(Reader(), None, None).report["source"] == "folders"
