"""Engine errors carry fields and name options in the API's words; the CLI says the same in flags, with the
exit code of the error's type."""

import pytest
from typer.testing import CliRunner

import cdiff_cli as cdiff
from cdiff_cli.cli import app
from cdiff_cli.cli._flags import flag
from cdiff_cli.errors import (
    BusyError,
    CdiffError,
    Message,
    NotFoundError,
    TrainingStopped,
    already_exists,
    option_error,
)

from .conftest import RES


def test_an_option_error_names_the_option_as_the_api_and_as_the_cli_do(tmp_path):
    with pytest.raises(CdiffError) as info:
        cdiff.merge(["a", "b"], ridge=-1.0, registry=tmp_path)
    e = info.value
    assert str(e) == "ridge must be a positive number, not -1.0" and e.options == ("ridge",)
    assert e.render(flag) == "--ridge must be a positive number, not -1.0"
    r = CliRunner().invoke(app, ["merge", "a", "b", "--ridge", "-1"], env={"CDIFF_HOME": str(tmp_path)})
    assert r.exit_code == 1 and "error: --ridge must be a positive number, not -1.0" in r.stderr


def test_flags_that_are_not_the_api_name_with_dashes():
    e = option_error("{n}, {class_word}, {sample_prompts}, {embeddings} and {out}", "n", "class_word", "sample_prompts",
                     "embeddings", "out")
    assert str(e) == "n, class_word, sample_prompts, embeddings and out"
    assert e.render(flag) == "-n, --class, --sample, --embedding and -o"


def test_switches_read_as_keyword_arguments_in_the_api():
    e = already_exists("mycat")
    assert e.name == "mycat" and str(e) == "concept 'mycat' already exists (use force=True to replace it)"
    assert e.render(flag) == "concept 'mycat' already exists (use --force to replace it)"


def test_text_from_the_user_is_never_read_as_a_placeholder():
    e = option_error("{rank} must be at least 1, not {value}", "rank", value="{energy}")
    assert str(e) == "rank must be at least 1, not {energy}"
    plain = CdiffError("a caption with {token} in it")
    assert str(plain) == plain.render(flag) == "a caption with {token} in it"
    plain.add(Message("; run again with {resume}", "resume"))
    assert plain.render(flag) == "a caption with {token} in it; run again with --resume"
    assert str(plain) == "a caption with {token} in it; run again with resume=True" == plain.args[0]


def test_exit_codes_by_type():
    assert [k("x").exit_code for k in (CdiffError, NotFoundError, BusyError, TrainingStopped)] == [1, 2, 3, 130]


def test_engine_warnings_name_options_in_the_api_words(tmp_path, sd1_base, cat_images):
    from cdiff_cli.progress import Progress

    class Keep(Progress):
        warnings: list = []

        def warn(self, message):
            self.warnings.append(message)

    p = Keep()
    cdiff.train("mycat", cat_images, class_word="cat", base=str(sd1_base), registry=tmp_path, steps=1, batch_size=1,
                resolution=RES, num_reg=0, reg="none", device="cpu", offload=True, samples=False, progress=p)
    (w,) = [m for m in p.warnings if "offload" in str(m)]
    assert str(w).startswith("offload does nothing on the CPU") and w.render(flag).startswith("--offload does nothing")


def test_a_train_config_checks_itself():
    from cdiff_cli.training import TrainConfig

    TrainConfig().check()
    for bad, option in ((dict(steps=0), "steps"), (dict(lr=float("nan")), "lr"), (dict(mode="qv"), "mode"),
                        (dict(precision="fp8"), "precision")):
        with pytest.raises(CdiffError) as info:
            TrainConfig(**bad).check()
        assert option in info.value.options
