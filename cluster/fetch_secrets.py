"""Put the W&B and Hugging Face tokens on this node from AWS SSM Parameter Store (SecureString).

Run by the setup_commands of cluster/ray-cluster-gpu.yaml on every node: the wandb logger runs
in the rank-0 training worker (any GPU node) and jobs/cache.py loads gated models on the workers,
so each node needs the tokens. Nothing is printed but the parameter names; a missing parameter
or permission is reported and skipped. Uses botocore (installed with s3fs), not boto3.

    python cluster/fetch_secrets.py --region us-east-1 \
        [--wandb-param /saescale/wandb-api-key] [--hf-param /saescale/hf-token]
"""

from __future__ import annotations

import argparse
import os
import sys


def fetch(client, name: str) -> str | None:
    try:
        return client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"].strip()
    except Exception as exc:  # ParameterNotFound, AccessDenied, no credentials...
        print(f"fetch_secrets: skipping {name}: {type(exc).__name__}", file=sys.stderr)
        return None


def write_private(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file existed
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def set_netrc(host: str, password: str) -> None:
    """Replace (or add) the `machine host` entry of ~/.netrc, the file wandb reads."""
    path = os.path.expanduser("~/.netrc")
    kept: list[str] = []
    if os.path.exists(path):
        skip = False
        with open(path) as handle:
            lines = handle.read().splitlines()
        for line in lines:
            if line.strip().startswith("machine "):
                skip = line.split()[1] == host
            if not skip:
                kept.append(line)
    kept += [f"machine {host}", "  login user", f"  password {password}"]
    write_private(path, "\n".join(kept) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", required=True)
    parser.add_argument("--wandb-param", default="/saescale/wandb-api-key")
    parser.add_argument("--hf-param", default="/saescale/hf-token")
    args = parser.parse_args()

    import botocore.session

    client = botocore.session.get_session().create_client("ssm", region_name=args.region)
    wandb_key = fetch(client, args.wandb_param)
    if wandb_key:
        set_netrc("api.wandb.ai", wandb_key)
        print(f"fetch_secrets: {args.wandb_param} -> ~/.netrc (api.wandb.ai)")
    hf_token = fetch(client, args.hf_param)
    if hf_token:
        home = os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
        write_private(os.path.join(home, "token"), hf_token)
        print(f"fetch_secrets: {args.hf_param} -> {home}/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
