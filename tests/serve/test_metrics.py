"""GET /metrics: Prometheus text that prometheus_client's own parser reads, counters that move."""

import pytest

pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one GET /metrics."""
    response = server.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_parse_and_move_with_requests(server, client, complete):
    before = scrape(server)
    assert value(before, "llmcli_kv_cache_slots_total") == 4
    assert value(before, "llmcli_running_sequences") == 0
    done = complete(client, "ROMEO:", max_tokens=12, n=2, extra_body={"ignore_eos": True})
    streamed = list(complete(client, "All:", max_tokens=7, stream=True, extra_body={"ignore_eos": True}))
    assert len(streamed) == 7 and done.usage.completion_tokens == 24
    server.wait_idle()
    after = scrape(server)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("llmcli_requests_total", path="/v1/completions", status="200") == 2
    assert moved("llmcli_generation_tokens_total") == 24 + 7
    assert moved("llmcli_prompt_tokens_total") == 2 * 6 + 4
    assert moved("llmcli_time_to_first_token_seconds_count") == 3  # one per sequence
    assert moved("llmcli_inter_token_latency_seconds_count") == 2 * 11 + 6
    assert moved("llmcli_time_to_first_token_seconds_sum") > 0
    assert value(after, "llmcli_kv_cache_tokens") == 0 and value(after, "llmcli_waiting_sequences") == 0
    assert value(after, "llmcli_kv_cache_blocks_total") == 4 * 64 // 16 and value(after, "llmcli_kv_cache_blocks_used") == 0
    # "ROMEO:" is 6 tokens, less than a block: nothing to share, but every prompt was looked up
    assert moved("llmcli_prefix_cache_queried_tokens") == 2 * 6 + 4 and moved("llmcli_prefix_cache_hit_tokens") == 0
    health = server.health()["kv_cache"]
    assert health == {"slots_used": 0, "slots": 4, "tokens": 0, "blocks_used": 0, "blocks": 16,
                      "prefix_hit_rate": value(after, "llmcli_prefix_cache_hit_ratio"), "preemptions": 0}


def test_shared_prompt_prefixes_show_as_prefix_cache_hits(start_server, complete, corpus_text):
    running = start_server(max_batch_size=2, block_tokens=4)
    client = running.client()
    prompt = corpus_text[:30]
    for _ in range(2):
        complete(client, prompt, max_tokens=2)
    samples = scrape(running)
    assert value(samples, "llmcli_prefix_cache_queried_tokens") == 2 * 30
    assert value(samples, "llmcli_prefix_cache_hit_tokens") == 28  # the second prompt's 7 full blocks
    assert value(samples, "llmcli_prefix_cache_hit_ratio") == 28 / 60


def test_malformed_bodies_are_counted_as_4xx_never_500(server):
    before = scrape(server)
    assert server.post("/v1/completions", b"{not json").status_code == 400
    assert server.post("/v1/completions", {"prompt": "ROMEO:", "stream": "yes"}).status_code == 400
    assert server.get("/v1/nothing").status_code == 404
    after = scrape(server)
    assert value(after, "llmcli_requests_total", path="/v1/completions", status="400") - \
        value(before, "llmcli_requests_total", path="/v1/completions", status="400") == 2
    assert value(after, "llmcli_requests_total", path="other", status="404") - \
        value(before, "llmcli_requests_total", path="other", status="404") == 1
    assert not [k for k in after if k[0] == "llmcli_requests_total" and ("status", "500") in k[1]]
    assert value(after, "llmcli_generation_tokens_total") == value(before, "llmcli_generation_tokens_total")


def test_each_server_has_its_own_registry(start_server, client, complete, server):
    complete(client, "ROMEO:", max_tokens=3)
    fresh = start_server(max_batch_size=2, api_key="secret")
    samples = scrape(fresh)  # public, like /health
    assert value(samples, "llmcli_generation_tokens_total") == 0
    assert value(samples, "llmcli_kv_cache_slots_total") == 2
    assert fresh.post("/v1/completions", {"prompt": "x"}).status_code == 401
    assert value(scrape(fresh), "llmcli_requests_total", path="/v1/completions", status="401") == 1
    assert value(scrape(server), "llmcli_requests_total", path="/v1/completions", status="401") == 0
