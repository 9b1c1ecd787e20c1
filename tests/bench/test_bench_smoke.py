"""Cheap checks of the benchmark's own plumbing (no processes, no timing)."""
import yaml

from bench import envoy, loadtools, readme, report
from bench.cases.workers import projected_scaling


def test_envoy_bootstrap_is_yaml_with_one_route_per_listener():
    doc = yaml.safe_load(yaml.safe_dump(envoy.bootstrap(9901, [("http", 8080, 9000, False), ("grpc", 8081, 9001, True)])))
    listeners = doc["static_resources"]["listeners"]
    clusters = {c["name"]: c for c in doc["static_resources"]["clusters"]}
    hcm = listeners[1]["filter_chains"][0]["filters"][0]["typed_config"]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["match"] == {"prefix": "/"} and route["route"]["cluster"] == "grpc_upstream"
    assert hcm["codec_type"] == "HTTP2"
    assert "typed_extension_protocol_options" in clusters["grpc_upstream"]
    assert "typed_extension_protocol_options" not in clusters["http_upstream"]


def test_results_table_and_required_keys_from_fake_measurements():
    side = lambda v: {"direct": {"req_per_s": v * 4, "req_per_cpu_s": v * 8},
                      "envoy": {"req_per_s": v * 2, "req_per_cpu_s": v * 2},
                      "protomesh": {"req_per_s": v, "req_per_cpu_s": v}}
    results = {"http": side(1000.0),
               "grpc_unary": {t: {"calls_per_s": 1.0, "calls_per_cpu_s": 2.0} for t in ("direct", "envoy", "protomesh")},
               "latency": {"http": {"added_p50_ms": 0.5}, "grpc": {"added_p50_ms": 0.7}},
               "memory": {"idle_rss_mb": 50.0, "loaded_rss_mb": 60.0},
               "control": {"streams": 10, "push_p99_ms": 5.0, "synced_before_edit": 10, "settle_s": 1.0,
                           "converged": 10, "push_p50_ms": 4.0, "push_max_ms": 6.0, "control_cpu_s_for_push": 0.1}}
    flat = report.flatten_required(results)
    assert all(flat[k] is not None for k in report.REQUIRED), flat
    text = report.table(results)
    assert "0.50x" in text  # protomesh req/s ÷ Envoy's


def test_wrk_parse_units():
    out = ("  Latency Distribution\n     50%  512.00us\n     99%    1.20s\n"
           "  1000 requests in 2.00s, 1.00MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:    500.00\n")
    r = loadtools.parse_wrk(out)
    assert (r["requests"], r["p50_ms"], r["p99_ms"], r["non_2xx"]) == (1000, 0.512, 1200.0, 3)


def test_readme_rewrite_replaces_only_between_markers():
    text = "# x\n\nintro\n"
    once = readme.rewrite(text, f"{readme.START}\nA\n{readme.END}")
    twice = readme.rewrite(once, f"{readme.START}\nB\n{readme.END}")
    assert once.startswith(text.rstrip("\n")) and "## Performance" in once
    assert "B" in twice and "\nA\n" not in twice and twice.count("## Performance") == 1


def test_workers_projection_is_the_measured_efficiency_per_core():
    assert projected_scaling(1.0) == 2.0
    assert projected_scaling(0.95) == 1.9
    assert projected_scaling(0.9, workers=4) == 3.6
