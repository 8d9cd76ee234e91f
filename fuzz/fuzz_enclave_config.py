"""atheris fuzz target for what the enclave parses before it runs anything: the parent's network offer (hostile,
arrives as CBOR in Start.config) and the app config and verity parameters (measured, still parsed strictly).

Run (atheris is not a project dependency; install it where you fuzz):
    pip install atheris
    python fuzz/fuzz_enclave_config.py -max_len=4096 -runs=1000000 [CORPUS_DIR]

Allowed out: NetConfigError (a RequestError), AppConfigError, VerityError, CborError. A parsed offer must survive
``to_dict`` → ``from_dict`` unchanged and its rendered files must not gain lines beyond its entries; anything else
is a finding.
"""

from __future__ import annotations

import sys

import atheris  # type: ignore[import-untyped]  # installed only where fuzzing runs

with atheris.instrument_imports():
    from salmiac.protocol import cbor
    from salmiac.protocol.appconfig import AppConfig, AppConfigError
    from salmiac.protocol.netconfig import NetConfigError, NetworkConfig
    from salmiac.rootfs.verity import VerityError, VerityInfo


def test_one_input(data: bytes) -> None:
    if not data:
        return
    which, rest = data[0] % 3, data[1:]
    if which == 0:
        try:
            raw = cbor.loads(rest)
        except cbor.CborError:
            return
        if not isinstance(raw, dict):
            return
        try:
            cfg = NetworkConfig.from_dict(raw)
        except NetConfigError:
            return
        if NetworkConfig.from_dict(cfg.to_dict()) != cfg:
            raise AssertionError("offer does not survive a round trip")
        resolv = cfg.render_resolv_conf().splitlines()
        if len(resolv) > 1 + len(cfg.dns_servers) + (1 if cfg.search_domains else 0):
            raise AssertionError(f"resolv.conf gained lines: {resolv!r}")
        if "\n" in cfg.render_hostname().rstrip("\n"):
            raise AssertionError("hostname spans lines")
    elif which == 1:
        try:
            app = AppConfig.from_json(rest)
        except AppConfigError:
            return
        if AppConfig.from_json(app.to_json()) != app:
            raise AssertionError("app config does not survive a round trip")
    else:
        try:
            raw = cbor.loads(rest)
            VerityInfo.from_dict(raw)
        except (cbor.CborError, VerityError):
            return


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
