"""Operate a model registry: list, verify, pin/unpin, prune, import, and ask a server to reload.

    python -m scripts.registry list
    python -m scripts.registry verify [NAME[/VERSION]]     # the server's own servability check
    python -m scripts.registry pin NAME VERSION        # roll back or forward; served after reload
    python -m scripts.registry unpin NAME              # serve the newest valid version again
    python -m scripts.registry prune NAME --keep 3 [--dry-run] [--url http://pod:3000 ...]
    python -m scripts.registry import FOLDER [--name NAME]   # copy an artifact in, atomically
    python -m scripts.registry reload --url http://127.0.0.1:3000   # token from GRAFT_ADMIN_TOKEN

Which version is served is decided by `models.servable`, the rule the server itself applies
(schema, checksums, ONNX Runtime load, warm-up; the pin first, then newest first): `list` marks
that version, `pin` refuses a version the server would refuse, and `prune` never deletes it.

Needs only the serving install (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from models import versions
from models.artifact import load_artifact, read_manifest
from models.errors import ArtifactError
from models.servable import open_version, resolve_ref, served_version  # noqa: F401 (resolve_ref: public helper)


def cmd_list(root: Path, args: argparse.Namespace) -> int:
    rows = []
    for name in versions.list_models(root):
        refused: dict[str, str] = {}
        served = served_version(root, name, refused)
        try:
            pin = versions.read_pin(root, name)
        except ArtifactError as e:
            pin = f"invalid ({e})"
        for v in reversed(versions.list_versions(root, name)):
            try:
                m = read_manifest(root / name / v)
                summary = f"{m.task:<21} {json.dumps(m.metrics.values)}"
            except ArtifactError as e:
                summary = f"INVALID: {e}"
            if v in refused:
                summary = f"REFUSED: {refused[v]}"
            mark = "*" if v == served else " "
            pinned = " (pinned)" if v == pin else ""
            rows.append(f"{mark} {name}/{v}{pinned}  {summary}")
        if not versions.list_versions(root, name):
            rows.append(f"  {name}/  (no versions)")
    print("\n".join(rows) if rows else f"(registry {root} is empty)")
    print("\n* = served by a fresh server (the newest version that passes every check, or the pin)", file=sys.stderr)
    return 0


def cmd_verify(root: Path, args: argparse.Namespace) -> int:
    targets: list[Path] = []
    if args.ref:
        name, _, version = args.ref.partition("/")
        targets = [root / name / version] if version else [root / name / v for v in versions.list_versions(root, name)]
    else:
        targets = [root / n / v for n in versions.list_models(root) for v in versions.list_versions(root, n)]
    bad = 0
    for folder in targets:
        try:
            open_version(folder, name=folder.parent.name)
            print(f"ok   {folder.parent.name}/{folder.name}")
        except ArtifactError as e:
            bad += 1
            print(f"FAIL {folder.parent.name}/{folder.name}: {e}")
    if not targets:
        print("nothing to verify")
    return 1 if bad else 0


def cmd_pin(root: Path, args: argparse.Namespace) -> int:
    open_version(root / args.name / args.version, name=args.name)  # never pin something the server would refuse
    versions.write_pin(root, args.name, args.version)
    print(f"pinned {args.name} to {args.version}; POST /admin/reload (or wait for the poll) to serve it")
    return 0


def cmd_unpin(root: Path, args: argparse.Namespace) -> int:
    versions.write_pin(root, args.name, None)
    print(f"unpinned {args.name}; the newest valid version will be served after a reload")
    return 0


def fleet_versions(urls: list[str], name: str) -> set[str]:
    """Versions of `name` that running servers report serving (GET /models on each URL)."""
    out = set()
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ArtifactError(f"--url must be http(s)://, got {url!r}")
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/models", timeout=30) as r:  # noqa: S310 (scheme checked)
                body = json.loads(r.read())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot ask {url} what it serves ({e}); nothing was deleted") from e
        for m in body.get("models", []):
            if m.get("name") == name and m.get("served_version"):
                out.add(m["served_version"])
    return out


def cmd_prune(root: Path, args: argparse.Namespace) -> int:
    all_versions = versions.list_versions(root, args.name)
    pin = versions.read_pin(root, args.name)
    keep = set(all_versions[-args.keep :]) if args.keep > 0 else set()
    # What the fleet serves: what the rule picks here (a restarted server's choice), and what the
    # servers named with --url say they serve (they may still hold an older version in memory).
    served = served_version(root, args.name)
    fleet = fleet_versions(args.url or [], args.name)
    keep |= {v for v in (pin, served, *fleet) if v}
    doomed = [v for v in all_versions if v not in keep]
    for v in doomed:
        print(("would delete " if args.dry_run else "deleted ") + f"{args.name}/{v}")
        if not args.dry_run:
            shutil.rmtree(root / args.name / v)
    why = (
        f"served: {served or 'none'}"
        + (f", pinned: {pin}" if pin else "")
        + (f", fleet: {sorted(fleet)}" if fleet else "")
    )
    print(f"kept {len(all_versions) - len(doomed)} version(s) of {args.name} ({why})")
    return 0


def cmd_import(root: Path, args: argparse.Namespace) -> int:
    src = Path(args.folder)
    art = load_artifact(src)
    name = args.name or art.name
    if name != art.name:
        raise ArtifactError(f"the manifest names this model {art.name!r}; import it under that name")
    dst = root / name / art.version
    if dst.exists():
        raise ArtifactError(f"{dst} already exists")
    # Copied under the registry's hidden staging folder, checked there by the server's own rule,
    # then renamed into place: a server polling the registry never sees a half-copied version,
    # and a failed import leaves no model folder behind.
    tmp = versions.staging_folder(root, name, art.version)
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for f in tmp.rglob("*"):  # servers may read the registry as another user
            f.chmod(versions.shared_file_mode() | (0o111 if f.is_dir() else 0))
        open_version(tmp, name=name)
        dst = versions.publish_folder(tmp, root, name, art.version)
    finally:
        versions.discard_staging(tmp)
    print(dst)
    return 0


def cmd_reload(root: Path, args: argparse.Namespace) -> int:
    token = os.environ.get("GRAFT_ADMIN_TOKEN", "")
    if not args.url.startswith(("http://", "https://")):
        raise ArtifactError(f"--url must be http(s)://, got {args.url!r}")
    req = urllib.request.Request(  # noqa: S310 (scheme checked above)
        args.url.rstrip("/") + "/admin/reload",
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:  # noqa: S310 (operator-supplied URL)
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:
        print(f"reload refused: HTTP {e.code} {e.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    print(json.dumps({"changed": body.get("changed"), "workers": body.get("workers")}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.registry", description=__doc__.splitlines()[0])
    p.add_argument("--registry", default=str(versions.default_registry()))
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="every version, its task and metrics; * marks the served one")
    v = sub.add_parser("verify", help="check that versions are servable: schema, checksums, ONNX Runtime, warm-up")
    v.add_argument("ref", nargs="?", help="NAME or NAME/VERSION (default: everything)")
    pin = sub.add_parser("pin", help="serve VERSION of NAME (rollback)")
    pin.add_argument("name")
    pin.add_argument("version")
    unpin = sub.add_parser("unpin", help="serve the newest valid version")
    unpin.add_argument("name")
    prune = sub.add_parser("prune", help="delete old versions (never the pinned or the served one)")
    prune.add_argument("name")
    prune.add_argument("--keep", type=int, default=3)
    prune.add_argument("--dry-run", action="store_true")
    prune.add_argument(
        "--url", action="append", help="a running server (repeat per pod): also keep the version it serves"
    )
    imp = sub.add_parser("import", help="copy an artifact folder into the registry atomically")
    imp.add_argument("folder")
    imp.add_argument("--name")
    rl = sub.add_parser("reload", help="POST /admin/reload on a running server")
    rl.add_argument("--url", default="http://127.0.0.1:3000")
    args = p.parse_args(argv)
    root = Path(args.registry)
    handler = {
        "list": cmd_list,
        "verify": cmd_verify,
        "pin": cmd_pin,
        "unpin": cmd_unpin,
        "prune": cmd_prune,
        "import": cmd_import,
        "reload": cmd_reload,
    }[args.cmd]
    try:
        return handler(root, args)
    except ArtifactError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
