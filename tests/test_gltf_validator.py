"""The exported GLB passes the Khronos glTF validator (npm package ``gltf-validator``).

The validator is a JavaScript library; a few lines of node call its ``validateBytes`` on the
file and print the JSON report. CI installs it into the virtual environment
(``npm install --prefix "$VIRTUAL_ENV/node" gltf-validator``, see .ci/run); elsewhere the
test is skipped, saying why, when node or the package is absent. NODE_PATH is searched too.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trimesh

ROOT = Path(__file__).resolve().parent.parent
INSTALL = 'npm install --prefix "$VIRTUAL_ENV/node" gltf-validator'

VALIDATE_JS = r"""
const fs = require("fs");
const validator = require("gltf-validator");
const bytes = new Uint8Array(fs.readFileSync(process.argv[1]));
validator.validateBytes(bytes, {maxIssues: 200})
  .then((report) => { process.stdout.write(JSON.stringify(report)); })
  .catch((err) => { process.stderr.write(String(err)); process.exit(1); });
"""


def _module_dirs():
    dirs = [Path(p) for p in os.environ.get("NODE_PATH", "").split(os.pathsep) if p]
    dirs += [Path(sys.prefix) / "node" / "node_modules", ROOT / "node_modules"]
    return [d for d in dirs if (d / "gltf-validator" / "package.json").is_file()]


def validate_glb(path) -> dict:
    """The validator's report on a GLB file (skips the test when it cannot run)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the Khronos glTF validator is a node package")
    dirs = _module_dirs()
    if not dirs:
        pytest.skip(f"the npm package gltf-validator is not installed ({INSTALL})")
    env = dict(os.environ, NODE_PATH=os.pathsep.join(str(d) for d in dirs))
    done = subprocess.run([node, "-e", VALIDATE_JS, str(path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


class Sphere(torch.nn.Module):
    """What export needs of a representation: a surface and an albedo field."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def surface(self, resolution):
        s = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
        return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces)

    def albedo(self, points):
        return (0.5 + 0.5 * points / 0.6).clamp(0, 1)


def test_exported_glb_passes_the_khronos_validator(tmp_path):
    from engine.export import ExportConfig, TurntableConfig, export_representation

    cfg = ExportConfig(formats=["glb"], texture_size=64, mesh_resolution=16,
                       turntable=TurntableConfig(enabled=False))
    glb = export_representation(Sphere(), tmp_path, cfg, device="cpu")["glb"]
    report = validate_glb(glb)
    issues = report["issues"]
    problems = [m for m in issues["messages"] if m["severity"] <= 1]    # 0 error, 1 warning
    assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, problems
    info = report["info"]
    assert info["totalVertexCount"] > 0 and info["totalTriangleCount"] > 0
    assert info["hasTextures"]
