import os

import pytest

from trainer import run_dir as run_files


@pytest.mark.parametrize("name", [".step-00000100.pt.tmp-4242", ".step-00000100.tmp", ".best.pt.tmp-4242",
                                  ".best.tmp-4242", ".status.json.tmp", ".config.yaml.tmp"])
def test_what_killed_saves_leave_is_a_temp_name(name):
    assert run_files.TEMP_NAME.match(name)


@pytest.mark.parametrize("name", ["step-00000100.pt", "step-00000100", "best.pt", "best",
                                  "best-step-00000100-val_loss=0.1234.pt", run_files.LOCK, run_files.STATUS,
                                  "notes.tmp"])
def test_files_a_run_keeps_are_not_temp_names(name):
    assert not run_files.TEMP_NAME.match(name)


def test_a_second_lock_on_a_run_directory_is_refused_until_the_first_is_released(tmp_path):
    # flock belongs to the open file, so a second open in the same process conflicts like another process.
    with run_files.RunLock(tmp_path):
        assert (tmp_path / run_files.LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(run_files.RunDirBusy) as busy:
            run_files.RunLock(tmp_path)
        assert busy.value.pid == os.getpid()
    run_files.RunLock(tmp_path).release()


def test_a_link_in_place_of_the_lock_file_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("someone's file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / run_files.LOCK).symlink_to(target)
    with pytest.raises(OSError):
        run_files.RunLock(run_dir)
    assert target.read_text() == "someone's file"


def test_clear_keeps_the_lock_and_removes_links_without_following_them(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "kept.txt").write_text("not the run's")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-00000001.pt").write_bytes(b"x")
    (run_dir / "link").symlink_to(outside)
    with run_files.RunLock(run_dir):
        run_files.clear(run_dir)
        assert [p.name for p in run_dir.iterdir()] == [run_files.LOCK]
    assert (outside / "kept.txt").read_text() == "not the run's"
