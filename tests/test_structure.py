"""PDB fetching: every source (local file, mirror layouts, cache, HTTP download), the atom selection,
the summary (checked against an independent reading of the PDB text), and every user error."""

from __future__ import annotations

import gzip
import http.server
import json
import shutil
import socket
import threading
from pathlib import Path

import gemmi
import numpy as np
import pytest
import yaml
from scipy.spatial.distance import pdist

from xrai.cli import main
from xrai.errors import XraiError
from xrai.structure import (
    fetch_structure,
    load_structure,
    protein_spec,
    read_atoms,
    resolve_structure_source,
    summarize,
)

N_ATOMS_2CEX_A = 2362


# --------------------------------------------------------------------------- helpers and fixtures


def chain_atoms_from_text(pdb_file: Path, chain: str) -> np.ndarray:
    """Coordinates of a chain's ATOM records, read straight from the PDB columns (independent of gemmi)."""
    rows = [line for line in pdb_file.read_text().splitlines()
            if line.startswith("ATOM  ") and line[21] == chain]
    return np.array([[float(r[30:38]), float(r[38:46]), float(r[46:54])] for r in rows])


def assert_one_line(message: str, *names: str) -> None:
    assert "\n" not in message, message
    for name in names:
        assert name in message, f"{name!r} not in {message!r}"


def structure_cfg(tmp_path: Path, **overrides) -> dict:
    """Structure config that can reach no real network: downloads go to a closed local port."""
    cfg = {"mirror": None, "cache_dir": str(tmp_path / "cache"), "timeout_s": 2, "retries": 0,
           "download_url": f"http://127.0.0.1:{closed_port()}/{{id}}.cif",
           "keep_waters": False, "keep_hydrogens": False, "keep_hetero": False}
    return {**cfg, **overrides}


def closed_port() -> int:
    """A local TCP port nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cif_text_of(pdb_file: Path) -> str:
    st = gemmi.read_structure(str(pdb_file))
    st.setup_entities()
    return st.make_mmcif_document().as_string()


@pytest.fixture(autouse=True)
def no_mirror_env(monkeypatch):
    """CI exports XRAI_PDB_MIRROR; each test sets it explicitly when it wants a mirror."""
    monkeypatch.delenv("XRAI_PDB_MIRROR", raising=False)


class _Server:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                body = server.files.get(self.path)
                if isinstance(body, int):  # an HTTP error status to answer with
                    self.send_error(body)
                    return
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def pdb_server(pdb_mirror):
    """A real HTTP server on 127.0.0.1 serving 2CEX as mmCIF; other ids answer 404."""
    files: dict[str, bytes] = {"/download/2CEX.cif": cif_text_of(pdb_mirror / "2cex.pdb").encode()}
    server = _Server(files)
    yield server
    server.close()


# --------------------------------------------------------------------------- sources


def test_mirror_gives_chain_a_only_with_2362_atoms_and_no_waters(pdb_mirror, tmp_path, monkeypatch, test_config):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    spec = protein_spec(test_config, "2CEX_A")
    assert spec == {"pdb": "2CEX", "chains": ["A"]}
    cfg = structure_cfg(tmp_path)
    summary = fetch_structure(spec, cfg, tmp_path / "out/2CEX_A.cif", tmp_path / "out/2CEX_A.json", name="2CEX_A")

    assert summary["n_atoms"] == N_ATOMS_2CEX_A
    assert summary["chains"] == ["A"] and summary["atoms_per_chain"] == {"A": N_ATOMS_2CEX_A}
    assert summary["source"] == str(pdb_mirror / "2cex.pdb")
    assert summary["pdb_id"] == "2CEX"
    assert summary["elements"] == {"C": 1516, "N": 382, "O": 456, "S": 8}
    assert sum(summary["elements"].values()) == N_ATOMS_2CEX_A
    assert json.loads((tmp_path / "out/2CEX_A.json").read_text())["n_atoms"] == N_ATOMS_2CEX_A
    assert "provenance" in summary and summary["provenance"]["xrai_version"]
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes left no temporaries
    assert not (tmp_path / "cache").exists()  # the mirror hit: nothing downloaded

    st = gemmi.read_structure(str(tmp_path / "out/2CEX_A.cif"))
    residues = [r for ch in st[0] for r in ch]
    assert [ch.name for ch in st[0]] == ["A"]
    assert not any(r.is_water() for r in residues)
    assert all(gemmi.find_tabulated_residue(r.name).is_amino_acid() for r in residues)

    # the written atoms are chain A's ATOM records exactly, in order
    positions, elements = read_atoms(tmp_path / "out/2CEX_A.cif")
    reference = chain_atoms_from_text(pdb_mirror / "2cex.pdb", "A")
    assert positions.shape == (N_ATOMS_2CEX_A, 3) and positions.dtype == np.float64
    assert len(elements) == N_ATOMS_2CEX_A and set(elements) == {"C", "N", "O", "S"}
    np.testing.assert_allclose(positions, reference, atol=1e-6)

    # summary geometry against brute force on the independently read coordinates
    centre = reference.mean(axis=0)
    np.testing.assert_allclose(summary["centre_A"], centre, atol=1e-3)
    rg = np.sqrt(((reference - centre) ** 2).sum(axis=1).mean())
    assert summary["radius_of_gyration_A"] == pytest.approx(rg, abs=1e-3)
    assert summary["max_extent_A"] == pytest.approx(pdist(reference).max(), abs=1e-3)


def test_explicit_pdb_chains_form(pdb_mirror, tmp_path, monkeypatch, test_config):
    from xrai.config import validate_config

    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    test_config["proteins"] = [{"name": "siap", "pdb": "2cex", "chains": ["B", "A"]}]
    validate_config(test_config)
    spec = protein_spec(test_config, "siap")
    assert spec == {"pdb": "2CEX", "chains": ["B", "A"]}
    summary = fetch_structure(spec, structure_cfg(tmp_path), tmp_path / "s.cif", tmp_path / "s.json")
    assert summary["atoms_per_chain"] == {"A": N_ATOMS_2CEX_A, "B": N_ATOMS_2CEX_A}
    assert summary["n_atoms"] == 2 * N_ATOMS_2CEX_A


def test_local_file_form_is_relative_to_the_working_directory(pdb_mirror, tmp_path, monkeypatch, test_config):
    from xrai.config import validate_config

    monkeypatch.chdir(pdb_mirror.parent)
    test_config["proteins"] = [{"name": "mine", "file": f"{pdb_mirror.name}/2cex.pdb", "chains": ["A"]}]
    validate_config(test_config)
    spec = protein_spec(test_config, "mine")
    cfg = structure_cfg(tmp_path)
    assert resolve_structure_source(spec, cfg) == Path(f"{pdb_mirror.name}/2cex.pdb")
    summary = fetch_structure(spec, cfg, tmp_path / "m.cif", tmp_path / "m.json", name="mine")
    assert summary["n_atoms"] == N_ATOMS_2CEX_A
    assert summary["pdb_id"] == "2CEX"  # from the file's header

    whole = fetch_structure({"file": str(pdb_mirror / "2cex.pdb"), "chains": None}, cfg,
                            tmp_path / "w.cif", tmp_path / "w.json")
    assert whole["chains"] == ["A", "B"] and whole["n_atoms"] == 2 * N_ATOMS_2CEX_A


@pytest.mark.parametrize("layout", [
    "2CEX.pdb", "2cex.pdb.gz", "2CEX.pdb.gz", "pdb2cex.ent", "pdb2cex.ent.gz", "2cex.cif", "2CEX.cif.gz",
    "ce/pdb2cex.ent.gz", "ce/2cex.cif.gz", "mmCIF/ce/2cex.cif.gz", "pdb/ce/pdb2cex.ent.gz",
])
def test_mirror_layouts(layout, pdb_mirror, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    target = mirror / layout
    target.parent.mkdir(parents=True)
    source = pdb_mirror / "2cex.pdb"
    data = cif_text_of(source).encode() if ".cif" in layout else source.read_bytes()
    target.write_bytes(gzip.compress(data) if layout.endswith(".gz") else data)
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(mirror))
    cfg = structure_cfg(tmp_path)
    assert resolve_structure_source({"pdb": "2CEX", "chains": ["A"]}, cfg) == target
    summary = fetch_structure({"pdb": "2CEX", "chains": ["A"]}, cfg, tmp_path / "o.cif", tmp_path / "o.json")
    assert summary["n_atoms"] == N_ATOMS_2CEX_A and summary["chains"] == ["A"]


def test_config_mirror_key_is_used_and_environment_overrides_it(pdb_mirror, tmp_path, monkeypatch):
    cfg = structure_cfg(tmp_path, mirror=str(pdb_mirror))
    assert resolve_structure_source({"pdb": "2CEX"}, cfg) == pdb_mirror / "2cex.pdb"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(pdb_mirror / "2cex.pdb", other / "2CEX.pdb")
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(other))
    assert resolve_structure_source({"pdb": "2CEX"}, cfg) == other / "2CEX.pdb"


def test_download_from_http_server_then_cache(pdb_server, tmp_path):
    cfg = structure_cfg(tmp_path, download_url=pdb_server.url + "/download/{id}.cif", retries=1)
    before = len(pdb_server.requests)
    summary = fetch_structure({"pdb": "2cex", "chains": ["A"]}, cfg, tmp_path / "a.cif", tmp_path / "a.json")
    assert summary["n_atoms"] == N_ATOMS_2CEX_A
    assert pdb_server.requests[before:] == ["/download/2CEX.cif"]
    cached = tmp_path / "cache" / "2CEX.cif"
    assert summary["source"] == str(cached) and cached.is_file()

    again = fetch_structure({"pdb": "2CEX", "chains": ["A"]}, cfg, tmp_path / "b.cif", tmp_path / "b.json")
    assert len(pdb_server.requests) == before + 1  # the second call read the cache
    assert again["n_atoms"] == N_ATOMS_2CEX_A and again["source"] == str(cached)


def test_mirror_without_the_entry_falls_through_to_download(pdb_server, tmp_path, monkeypatch):
    empty = tmp_path / "empty_mirror"
    empty.mkdir()
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(empty))
    cfg = structure_cfg(tmp_path, download_url=pdb_server.url + "/download/{id}.cif")
    assert resolve_structure_source({"pdb": "2CEX"}, cfg) == tmp_path / "cache" / "2CEX.cif"


# --------------------------------------------------------------------------- selection


def _pdb_line(record, serial, name, resname, seq, xyz, element, altloc=" ", occ=1.0, chain="A"):
    name = f" {name:<3}" if len(element) == 1 and len(name) < 4 else f"{name:<4}"
    return (f"{record:<6}{serial:>5} {name}{altloc}{resname:>3} {chain}{seq:>4}    "
            f"{xyz[0]:8.3f}{xyz[1]:8.3f}{xyz[2]:8.3f}{occ:6.2f}{20.0:6.2f}          {element:>2}")


def _synthetic_pdb() -> str:
    """Two models of a chain GLY-SER-MSE-ALA (SER has a hydrogen and two OG conformers), then SO4 and 2 waters."""
    residues = [
        ("ATOM", "GLY", 1, [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O")]),
        ("ATOM", "SER", 2, [("N", "N"), ("CA", "C"), ("CB", "C"), ("OG", "O", "A", 0.6), ("OG", "O", "B", 0.4),
                            ("C", "C"), ("O", "O"), ("H", "H")]),
        ("HETATM", "MSE", 3, [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"), ("CB", "C"), ("CG", "C"),
                              ("SE", "SE"), ("CE", "C")]),
        ("ATOM", "ALA", 4, [("N", "N"), ("CA", "C"), ("C", "C"), ("O", "O"), ("CB", "C")]),
        ("TER", None, None, []),
        ("HETATM", "SO4", 101, [("S", "S"), ("O1", "O"), ("O2", "O"), ("O3", "O"), ("O4", "O")]),
        ("HETATM", "HOH", 201, [("O", "O")]),
        ("HETATM", "HOH", 202, [("O", "O")]),
    ]
    lines = []
    for model, shift in ((1, 0.0), (2, 100.0)):
        lines.append(f"MODEL     {model:>4}")
        serial = 0
        for record, resname, seq, atoms in residues:
            if record == "TER":
                lines.append("TER")
                continue
            for name, element, *alt in atoms:
                serial += 1
                xyz = (1.5 * serial + shift, float(serial % 3), 0.7 * (serial % 5))
                lines.append(_pdb_line(record, serial, name, resname, seq, xyz, element, *alt))
        lines.append("ENDMDL")
    return "\n".join(lines) + "\nEND\n"


@pytest.mark.parametrize("keep, expected", [
    ({}, 23),  # GLY 4 + SER 6 (one OG, no H) + MSE 8 (part of the chain) + ALA 5
    ({"keep_hydrogens": True}, 24),
    ({"keep_waters": True}, 25),
    ({"keep_hetero": True}, 28),  # + SO4
    ({"keep_waters": True, "keep_hydrogens": True, "keep_hetero": True}, 31),
])
def test_selection_rules(keep, expected, tmp_path):
    path = tmp_path / "synthetic.pdb"
    path.write_text(_synthetic_pdb())
    st = load_structure(path, **keep)
    assert len(st) == 1  # first model only
    names = [(r.name, a.name, a.altloc) for ch in st[0] for r in ch for a in r]
    assert len(names) == expected
    assert ("MSE", "SE", "\0") in names
    og = [a for ch in st[0] for r in ch for a in r if a.name == "OG"]
    assert len(og) == 1 and og[0].occ == pytest.approx(0.6)  # the first conformer
    assert max(a.pos.x for ch in st[0] for r in ch for a in r) < 100  # nothing from model 2
    assert (("HOH", "O", "\0") in names) == keep.get("keep_waters", False)
    assert (("SO4", "S", "\0") in names) == keep.get("keep_hetero", False)
    assert summarize(st)["n_atoms"] == expected


def test_elements_are_fixed_for_files_without_element_column(pdb_mirror):
    """4ake.pdb here is a CHARMM-style file (no element column, names like 'CA  ' and 'HT1')."""
    path = pdb_mirror / "4ake.pdb"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    heavy = summarize(load_structure(path))
    assert set(heavy["elements"]) == {"C", "N", "O", "S"}
    with_h = summarize(load_structure(path, keep_hydrogens=True))
    assert set(with_h["elements"]) == {"C", "H", "N", "O", "S"}
    assert with_h["n_atoms"] - heavy["n_atoms"] == with_h["elements"]["H"]


def test_max_extent_of_flat_and_tiny_sets():
    from xrai.structure import max_pairwise_distance

    square = np.array([[0, 0, 0], [3, 0, 0], [0, 4, 0], [3, 4, 0], [1, 1, 0]], dtype=float)
    assert max_pairwise_distance(square) == pytest.approx(5.0)
    assert max_pairwise_distance(square[:1]) == 0.0
    rng = np.random.default_rng(0)
    cloud = rng.normal(size=(500, 3)) * [10, 3, 1]
    assert max_pairwise_distance(cloud) == pytest.approx(pdist(cloud).max())


# --------------------------------------------------------------------------- errors


def test_missing_chain_lists_the_chains_present(pdb_mirror, tmp_path, monkeypatch):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    with pytest.raises(XraiError) as err:
        fetch_structure({"pdb": "2CEX", "chains": ["Z"]}, structure_cfg(tmp_path), tmp_path / "o.cif",
                        tmp_path / "o.json")
    assert_one_line(str(err.value), "2cex.pdb", "chain 'Z' not found", "chains present: 'A', 'B'")
    assert not (tmp_path / "o.cif").exists()


def test_unknown_id_is_http_404(pdb_server, tmp_path):
    cfg = structure_cfg(tmp_path, download_url=pdb_server.url + "/download/{id}.cif", retries=3)
    before = len(pdb_server.requests)
    with pytest.raises(XraiError) as err:
        resolve_structure_source({"pdb": "0XXX"}, cfg)
    url = pdb_server.url + "/download/0XXX.cif"
    assert str(err.value) == f"PDB id '0XXX' not found at {url} (HTTP 404)"
    assert len(pdb_server.requests) == before + 1  # a 404 is not retried
    assert not (tmp_path / "cache" / "0XXX.cif").exists()


def test_server_error_is_retried_then_reported(tmp_path):
    server = _Server({"/1ABC.cif": 503})
    try:
        cfg = structure_cfg(tmp_path, download_url=server.url + "/{id}.cif", retries=1)
        with pytest.raises(XraiError) as err:
            resolve_structure_source({"pdb": "1ABC"}, cfg)
        assert len(server.requests) == 2
    finally:
        server.close()
    assert_one_line(str(err.value), "1ABC", "after 2 tries", "HTTP 503", "XRAI_PDB_MIRROR")


def test_malformed_download_is_not_cached(tmp_path):
    server = _Server({"/1ABC.cif": b"<html>rate limited</html>"})
    try:
        cfg = structure_cfg(tmp_path, download_url=server.url + "/{id}.cif")
        with pytest.raises(XraiError) as err:
            resolve_structure_source({"pdb": "1ABC"}, cfg)
    finally:
        server.close()
    assert_one_line(str(err.value), server.url + "/1ABC.cif")
    assert not (tmp_path / "cache" / "1ABC.cif").exists()


def test_no_network_suggests_the_mirror_variable(tmp_path):
    cfg = structure_cfg(tmp_path, retries=1)
    with pytest.raises(XraiError) as err:
        resolve_structure_source({"pdb": "2CEX"}, cfg)
    assert_one_line(str(err.value), "cannot download PDB id '2CEX'", cfg["download_url"].format(id="2CEX"),
                    "after 2 tries", "refused", "XRAI_PDB_MIRROR")


def test_timeout_is_reported(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        port = silent.getsockname()[1]
        cfg = structure_cfg(tmp_path, download_url=f"http://127.0.0.1:{port}/{{id}}.cif", timeout_s=0.3)
        with pytest.raises(XraiError) as err:
            resolve_structure_source({"pdb": "2CEX"}, cfg)
    assert_one_line(str(err.value), "2CEX", "timed out", "XRAI_PDB_MIRROR")


def test_missing_mirror_directory_names_its_origin(tmp_path, monkeypatch):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(tmp_path / "nope"))
    with pytest.raises(XraiError) as err:
        resolve_structure_source({"pdb": "2CEX"}, structure_cfg(tmp_path))
    assert_one_line(str(err.value), str(tmp_path / "nope"), "XRAI_PDB_MIRROR", "does not exist")
    monkeypatch.delenv("XRAI_PDB_MIRROR")
    with pytest.raises(XraiError) as err:
        resolve_structure_source({"pdb": "2CEX"}, structure_cfg(tmp_path, mirror=str(tmp_path / "nope")))
    assert_one_line(str(err.value), "structure.mirror")


def test_local_file_not_found(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(XraiError) as err:
        resolve_structure_source({"file": "data/mine.pdb"}, structure_cfg(tmp_path))
    assert_one_line(str(err.value), "data/mine.pdb", "not found", f"relative to {tmp_path}")


@pytest.mark.parametrize("filename, content, expected", [
    ("empty.pdb", b"", "file is empty"),
    ("blank.cif", b"  \n\n", "file is empty"),
    ("garbage.pdb", b"this is not a structure\nat all\n", "no atoms found"),
    ("broken.cif", b"data_x\n_a 1\n_a 2 3 loop_\n", "malformed mmCIF"),
    ("noatoms.cif", b"data_x\n_cell.length_a 10\n", "no atoms found"),
    ("bad.pdb.gz", b"\x1f\x8b\x08\x00 definitely not gzip", "not a valid gzip"),
    ("truncated.cif.gz", gzip.compress(b"data_x\n" * 50, mtime=0)[:20], "not a valid gzip"),
])
def test_empty_or_malformed_files(filename, content, expected, tmp_path):
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(XraiError) as err:
        fetch_structure({"file": str(path)}, structure_cfg(tmp_path), tmp_path / "o.cif", tmp_path / "o.json")
    assert_one_line(str(err.value), str(path), expected)
    assert not (tmp_path / "o.cif").exists() and not (tmp_path / "o.json").exists()


def test_selection_leaving_no_atoms(tmp_path):
    path = tmp_path / "waters.pdb"
    path.write_text("\n".join(_pdb_line("HETATM", i + 1, "O", "HOH", 300 + i, (i, 0.0, 0.0), "O")
                              for i in range(3)) + "\nEND\n")
    with pytest.raises(XraiError) as err:
        load_structure(path, chains=["A"])
    assert_one_line(str(err.value), str(path), "leaves 0 atoms", "keep_waters=False")
    assert len(load_structure(path, keep_waters=True)[0]["A"]) == 3


def test_protein_names_not_in_config(test_config):
    assert protein_spec(test_config, "4ake") == {"pdb": "4AKE", "chains": None}
    assert protein_spec(test_config, "1abc_B") == {"pdb": "1ABC", "chains": ["B"]}
    with pytest.raises(XraiError) as err:
        protein_spec(test_config, "lysozyme")
    assert_one_line(str(err.value), "'lysozyme'", "2CEX_A")


# --------------------------------------------------------------------------- command line


def _cli_config(tmp_path: Path, repo_root: Path, download_url: str) -> Path:
    cfg = yaml.safe_load((repo_root / "config" / "test.yaml").read_text())
    cfg["structure"].update(cache_dir=str(tmp_path / "cache"), download_url=download_url, retries=0, timeout_s=2)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("xrai fetch: error:")]


def test_cli_fetch_writes_cif_and_default_summary(pdb_mirror, tmp_path, monkeypatch, repo_root):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    config = _cli_config(tmp_path, repo_root, f"http://127.0.0.1:{closed_port()}/{{id}}.cif")
    out = tmp_path / "results/structures/2CEX_A.cif"
    assert main(["fetch", "--config", str(config), "--protein", "2CEX_A", "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["n_atoms"] == N_ATOMS_2CEX_A and summary["name"] == "2CEX_A"
    assert summary["provenance"]["config"]["detector"]["n_pixels"] == 32
    assert read_atoms(out)[0].shape == (N_ATOMS_2CEX_A, 3)


def test_cli_chain_z_is_one_line_error(pdb_mirror, tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    config = _cli_config(tmp_path, repo_root, f"http://127.0.0.1:{closed_port()}/{{id}}.cif")
    code = main(["fetch", "--config", str(config), "--protein", "2CEX_Z", "--out", str(tmp_path / "z.cif")])
    assert code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1
    assert_one_line(lines[0], "chain 'Z' not found", "'A', 'B'")


def test_cli_unknown_pdb_id_is_one_line_error(pdb_mirror, pdb_server, tmp_path, monkeypatch, capsys, repo_root):
    monkeypatch.setenv("XRAI_PDB_MIRROR", str(pdb_mirror))
    config = _cli_config(tmp_path, repo_root, pdb_server.url + "/download/{id}.cif")
    code = main(["fetch", "--config", str(config), "--protein", "0XXX", "--out", str(tmp_path / "x.cif")])
    assert code == 2
    lines = _error_lines(capsys.readouterr().err)
    assert lines == [f"xrai fetch: error: PDB id '0XXX' not found at {pdb_server.url}/download/0XXX.cif (HTTP 404)"]
