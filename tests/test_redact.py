"""No secrets in outputs: credentials given as Beam options never reach a manifest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import run_cli
from vlforge.pipeline.redact import REDACTED, is_secret_name, redact, redact_args

SECRETS = ["AKIAEXAMPLEKEY", "wJalrXUtnFEMI/K7MDENG", "FwoGZXIvYXdzEJr", "AccountKey=abc123=="]


def test_secret_option_values_are_hidden_in_both_flag_forms():
    args = [
        "--runner", "DirectRunner", "--s3_secret_access_key", SECRETS[1],
        f"--s3_access_key_id={SECRETS[0]}", "--s3_session_token", SECRETS[2],
        "--azure_connection_string", f"DefaultEndpointsProtocol=https;{SECRETS[3]}",
        "--temp_location", "s3://user:pw@bucket/tmp", "--num_workers", "4",
    ]  # fmt: skip
    out = redact_args(args)
    assert not any(secret in " ".join(out) for secret in SECRETS + ["pw@"])
    assert out[:2] == ["--runner", "DirectRunner"] and out[-2:] == ["--num_workers", "4"]
    assert out[3] == REDACTED and out[4] == f"--s3_access_key_id={REDACTED}"
    assert out[10] == f"s3://{REDACTED}@bucket/tmp"


def test_names_are_matched_on_whole_parts():
    assert all(map(is_secret_name, ["s3_session_token", "api-key", "Password", "azure_sas"]))
    assert not any(map(is_secret_name, ["max_tokens", "tokenizer", "author", "keys", "passes"]))


def test_nested_manifests_and_signed_urls():
    manifest = {
        "config": {"beam_args": ["--s3_secret_access_key=" + SECRETS[1]], "token": SECRETS[2]},
        "inputs": ["https://h/list.parquet?X-Amz-Signature=deadbeef&part=1"],
        "counts": {"tokens": 12},
    }
    text = json.dumps(redact(manifest))
    assert not any(secret in text for secret in SECRETS + ["deadbeef"])
    assert '"tokens": 12' in text and "part=1" in text


def test_corpus_manifest_holds_no_secret(world_server, tmp_path):
    urls = [world_server.image_url(41, i) for i in range(3)]
    captions = [f"a small red circle above a blue square {i}" for i in range(3)]
    pq.write_table(pa.table({"url": urls, "caption": captions}), tmp_path / "l.parquet")
    code, stdout, stderr = run_cli(
        "corpus", "--urls", str(tmp_path / "l.parquet"), "--out", str(tmp_path / "out"),
        "--allow-private", "127.0.0.0/8", "--no-progress",
        "--s3_secret_access_key", SECRETS[1], f"--s3_access_key_id={SECRETS[0]}",
    )  # fmt: skip
    assert code == 0, stderr
    written = (tmp_path / "out" / "manifest.json").read_text()
    assert "s3_secret_access_key" in written  # the flag is recorded, its value is not
    for secret in SECRETS[:2]:
        assert secret not in written and secret not in stdout
