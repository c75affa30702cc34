"""Loading the model (sft_hf/modeling.py): a mistyped local path is one line, not a Hub lookup."""
import pytest

from sft_hf.run.config import RecipeError


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model"])
def test_a_missing_model_folder_is_named_in_one_line(path):
    from sft_hf.modeling import resolve_model_path

    with pytest.raises(RecipeError, match=rf"^model {path}: no such folder"):
        resolve_model_path(path)
