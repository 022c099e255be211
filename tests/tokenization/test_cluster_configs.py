"""ray_config.yaml and cluster/ray_onprem.yaml pass Ray's own cluster-config preparation and schema validation."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from _util import REPO

CONFIGS = ["ray_config.yaml", "cluster/ray_onprem.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_config_validates(name):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(open(os.path.join(REPO, name)))
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    commands = " ".join(prepared["head_setup_commands"] + prepared["worker_setup_commands"])
    assert "pip install" in commands and "genrec-dist" in commands
    assert prepared["file_mounts"]["~/genrec-dist"] == "."
    # A mistake is caught by the same validation (so the check above can fail).
    broken = copy.deepcopy(raw)
    broken["setup_comands"] = broken.pop("setup_commands")  # a misspelt key
    with pytest.raises(jsonschema.ValidationError, match="'setup_comands' was unexpected"):
        validate_config(prepare_config(broken))


def test_aws_config_has_gpu_workers():
    raw = yaml.safe_load(open(os.path.join(REPO, "ray_config.yaml")))
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    workers = [t for n, t in types.items() if n != raw["head_node_type"]]
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers)  # AWS GPU families
