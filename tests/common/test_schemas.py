from services.common.schemas import render_schemas
from tests.conftest import REPO_ROOT


def test_committed_schemas_match_the_models():
    folder = REPO_ROOT / "proto" / "schemas"

    rendered = render_schemas()

    committed = {path.name: path.read_text() for path in folder.glob("*.schema.json")}
    assert committed == rendered, "run `make schemas` and commit proto/schemas"
