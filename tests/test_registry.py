"""Registry: decorator, did-you-mean, duplicates, and entry-point plugins living outside the package."""
import json
import os
import subprocess
import sys

import pytest

from harness.routing import registry
from harness.conformance import check_router
from harness.routing.registry import (PluginLoadError, UnknownRouterError, create_router, get_router, register_router,
                              router_names)
from harness.routing.router import Router

PLUGIN_SRC = '''
import torch
from torch import nn
from harness.routing.router import Router, Routing


class HashRouter(Router):
    """Hash routing (Roller et al. 2021): expert = token id mod E, plus a learned gate scale."""

    description = "token-id hash routing (test plugin)"

    def __init__(self, d_model, num_experts, top_k, scale: float = 1.0):
        super().__init__(d_model, num_experts, top_k)
        self.gate = nn.Linear(d_model, 1)
        self.scale = scale

    def forward(self, x, ctx):
        ids = ctx.token_ids if ctx.token_ids is not None else torch.arange(x.shape[0], device=x.device)
        first = ids.remainder(self.num_experts)
        idx = torch.stack([(first + j) % self.num_experts for j in range(self.top_k)], 1)
        w = torch.sigmoid(self.gate(x)).expand(-1, self.top_k) * self.scale / self.top_k
        return Routing(indices=idx, weights=w, logits=None)
'''


def make_fake_distribution(root, dist="hash-router-plugin", module="hash_router_plugin", eps=None, src=PLUGIN_SRC):
    """A distribution outside the repo: module + .dist-info with entry_points.txt, found via sys.path."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(src)
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = eps or {"hashrouter": f"{module}:HashRouter"}
    lines = "\n".join(f"{k} = {v}" for k, v in eps.items())
    (info / "entry_points.txt").write_text(f"[moe_harness.routers]\n{lines}\n")
    return root


@pytest.fixture
def plugin_path(tmp_path, monkeypatch):
    make_fake_distribution(tmp_path / "site")
    make_fake_distribution(tmp_path / "site2", dist="broken-plugin", module="broken_plugin",
                           eps={"brokenrouter": "broken_plugin:Nope"}, src="raise ImportError('missing dep foo')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(tmp_path / "site2"))
    registry.refresh_entry_points()
    yield tmp_path
    for name in ("hashrouter", "brokenrouter"):
        registry.unregister_router(name)
    for mod in ("hash_router_plugin", "broken_plugin"):
        sys.modules.pop(mod, None)


def test_builtins_registered():
    names = router_names()
    for n in ("dense", "smoe", "xmoe", "stablemoe", "competesmoe", "moge"):
        assert n in names


def test_unknown_router_did_you_mean():
    with pytest.raises(UnknownRouterError) as ei:
        get_router("smoee")
    msg = str(ei.value)
    assert "Did you mean 'smoe'" in msg and "Known routers:" in msg and "moge" in msg


def test_decorator_returns_class_unchanged_and_rejects_duplicates_and_non_routers():
    class R(Router):
        def forward(self, x, ctx):
            raise NotImplementedError

    try:
        assert register_router("test-r")(R) is R
        assert get_router("test-r") is R

        class R2(Router):
            pass

        with pytest.raises(ValueError, match="already registered"):
            register_router("test-r")(R2)
        with pytest.raises(TypeError, match="subclass of harness.routing.router.Router"):
            register_router("test-x")(dict)
    finally:
        registry.unregister_router("test-r")


def test_unknown_hparam_names_router_and_valid_keys():
    with pytest.raises(TypeError) as ei:
        create_router("smoe", 8, 4, 2, balance_wieght=0.1)
    assert "'smoe'" in str(ei.value) and "balance_weight" in str(ei.value)


def test_entry_point_plugin_found_listed_and_conformant(plugin_path):
    assert "hashrouter" in router_names()
    rows = {r["name"]: r for r in registry.describe_routers()}
    assert rows["hashrouter"]["origin"] == "package hash-router-plugin"
    assert rows["hashrouter"]["description"] == "token-id hash routing (test plugin)"
    assert rows["smoe"]["origin"] == "built-in"
    check_router("hashrouter")


def test_broken_plugin_named_error_and_others_still_work(plugin_path):
    with pytest.raises(PluginLoadError) as ei:
        get_router("brokenrouter")
    msg = str(ei.value)
    assert "brokenrouter" in msg and "broken-plugin" in msg and "broken_plugin:Nope" in msg and "missing dep foo" in msg
    assert get_router("smoe").router_name == "smoe"
    rows = {r["name"]: r for r in registry.describe_routers()}
    assert rows["brokenrouter"]["description"].startswith("BROKEN")


def test_cli_lists_plugin_from_outside_the_repo(plugin_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_path / "site"), str(plugin_path / "site2")])}
    out = subprocess.run([sys.executable, "-m", "harness.cli", "routers"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "hashrouter" in out.stdout and "package hash-router-plugin" in out.stdout
    assert "BROKEN" in out.stdout and "smoe" in out.stdout and "dense" in out.stdout


def test_cli_misspelt_router_suggests(tmp_path):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--routers", "mogee",
                          "--store", str(tmp_path / "s.duckdb")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr  # one line
    assert "Did you mean 'moge'" in out.stderr
    assert not (tmp_path / "s.duckdb").exists()


# -- named variants: name@variant -------------------------------------------------------


def test_variant_resolves_to_router_with_variant_defaults():
    cls = get_router("moge@paper")
    assert issubclass(cls, get_router("moge")) and cls.router_name == "moge@paper"
    assert cls.hparam_defaults()["penalize"] == "logits" and get_router("moge").hparam_defaults()["penalize"] == "probs"
    assert get_router("moge@paper") is cls  # cached: one class per variant
    r = create_router("moge@paper", 8, 16, 2, sigma_max=4.0)  # explicit keywords still win
    assert (r.penalize, r.padding, r.sigma_max) == ("logits", "same", 4.0)
    with pytest.raises(TypeError, match="moge@paper"):
        create_router("moge@paper", 8, 16, 2, not_a_key=1)
    assert "moge@paper" in registry.variant_names() and "moge" not in registry.variant_names()
    assert registry.variant_args("moge@vit")["reduction"] == "sum_window" and registry.variant_args("moge") == {}


def test_unknown_variant_lists_known_ones():
    with pytest.raises(UnknownRouterError) as ei:
        get_router("moge@papr")
    msg = str(ei.value)
    assert "unknown variant 'papr' of router 'moge'" in msg and "Did you mean 'moge@paper'" in msg
    assert "Known variants: code, paper, vit" in msg
    with pytest.raises(UnknownRouterError, match="Known routers"):
        get_router("mogee@paper")


def test_variants_get_distinct_spec_hashes_names_and_merged_router_args(tmp_path):
    from harness.spec import load_suite

    spec = load_suite("lm", routers=["moge", "moge@paper", "moge@code"],
                      overrides=["router_args.moge.sigma_min=0.5", "router_args.moge@paper.sigma_max=3.0"])
    runs = {r.router: r for r in spec.runs()}
    hashes = {r.spec_hash for r in runs.values()}
    assert len(hashes) == 3  # moge@code has moge's values but is a distinct name (and hashes its variant args)
    assert runs["moge@paper"].run_key.startswith("lm-moge@paper-")
    assert runs["moge"].router_kwargs == {"sigma_min": 0.5}
    assert runs["moge@paper"].router_kwargs == {"sigma_min": 0.5, "sigma_max": 3.0}  # base args, then its own
    assert runs["moge@code"].router_kwargs == {"sigma_min": 0.5}
    # the stored config rebuilds the variant (resume, evaluation)
    from harness.suites.lm import build_lm

    m = build_lm(runs["moge@paper"].to_dict())
    router = m.moe_layers()[0].router
    assert router.router_name == "moge@paper" and router.penalize == "logits" and router.sigma_max == 3.0
    # a plain name's hash does not see the variant machinery
    plain = load_suite("lm", routers=["moge"]).runs()[0]
    assert "variant_args" not in plain.to_dict()


def test_suite_yaml_selects_variants(tmp_path):
    from harness.spec import SpecError, load_suite

    y = tmp_path / "s.yaml"
    y.write_text("suite: lm\nrouters: [smoe, smoe@gshard]\nrouter_args:\n  smoe@gshard: {balance_weight: 0.02}\n")
    spec = load_suite(str(y))
    assert spec.routers == ("smoe", "smoe@gshard")
    run = [r for r in spec.runs() if r.router == "smoe@gshard"][0]
    assert run.router_kwargs == {"balance_weight": 0.02}
    y.write_text("suite: lm\nrouters: [smoe@nope]\n")
    with pytest.raises((UnknownRouterError, SpecError), match="Known variants"):
        load_suite(str(y))


def test_cli_lists_variants_and_rejects_unknown_variant(tmp_path, capsys):
    from harness import cli

    assert cli.main(["routers"]) == 0
    out = capsys.readouterr().out
    assert "moge@paper" in out and "smoe@gshard" in out and "xmoe@torchscale" in out
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", "--suite", "lm", "--routers", "moge,moge@nope",
                          "--store", str(tmp_path / "s.duckdb")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "unknown variant 'nope' of router 'moge'" in out.stderr and "Known variants: code, paper, vit" in out.stderr
    assert not (tmp_path / "s.duckdb").exists()


def test_spec_hash_follows_router_defaults():
    """A router whose defaults change gets new spec hashes (the store must not skip it as already finished)."""
    from harness.spec import load_suite

    def make(default):
        class R(Router):
            def __init__(self, d_model, num_experts, top_k, weight: float = default):
                super().__init__(d_model, num_experts, top_k)

        return R

    hashes = []
    for default in (0.1, 0.2, 0.1):
        registry.unregister_router("test-defaults")
        register_router("test-defaults")(make(default))
        try:
            hashes.append(load_suite("lm", routers=["test-defaults"]).runs()[0].spec_hash)
        finally:
            registry.unregister_router("test-defaults")
    assert hashes[0] != hashes[1] and hashes[0] == hashes[2]
    dense = load_suite("lm", routers=["dense"]).runs()[0]
    assert "router_defaults" not in json.dumps(dense.to_dict())  # stored config unchanged; dense has no defaults
