"""What `sejd serve` checks before it starts Ray: Ray Serve is installed, the port can be bound on the
host, the read deadline is a time, and the source opens with every plan it would serve valid. Each failure
is one SejdError, instead of a Ray start-up that fails half a minute later in pages of replica logs."""

from __future__ import annotations

import errno
import math
import socket
import types

from sejd.core.errors import SejdError


def require_ray() -> None:
    from sejd.core.extras import require

    require("ray.serve", "`sejd serve`")


def host_address(host: str, port: int = 0) -> tuple:
    """(address family, socket address) of `host`, a name or an IPv4/IPv6 address."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError, ValueError) as e:  # UnicodeError: not a valid name ('a..b')
        raise SejdError(f"--host {host!r} is not an address of this machine ({e})") from None
    return family, address


def check_port(host: str, port: int) -> None:
    """The port is a TCP port that is free on `host` (Serve's HTTP proxy binds it)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SejdError(f"--port must be a TCP port 1..65535, got {port!r}")
    family, address = host_address(host, port)
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as e:
            why = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise SejdError(f"port {port} on {host} {why}; choose another --port") from None


def check_read_timeout(seconds) -> None:
    """The read deadline is a finite number of seconds > 0."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise SejdError(f"--read-timeout-s must be a finite number of seconds > 0, got {seconds!r}")


def check_extras(cfg, text_encoder: str | None, vae: str | None) -> None:
    """A STARFlow's --text-encoder and --vae: for a STARFlow only, local folders, their packages installed
    (each replica loads them; nothing here loads a model)."""
    from sejd.core.extras import require
    from sejd.serve.service import check_extras as for_this_model

    for_this_model(cfg, text_encoder, vae)
    if text_encoder is not None:
        from sejd.workflows.text import TextEncoder

        TextEncoder(text_encoder)  # the folder, its config.json and tokenizer file
        require("transformers", "`sejd serve --text-encoder`")
    if vae is not None:
        from sejd.workflows.vae import LatentDecoder

        LatentDecoder(vae)
        require("diffusers", "`sejd serve --vae`")


def check_source(source: str, backend: str, config: dict | None = None, text_encoder: str | None = None,
                 vae: str | None = None):
    """Opens what every replica will open, short of building engines (which a replica does once, on its
    own device): a bundle's verified files, the backend's engines and every plan it serves; a checkpoint;
    a STARFlow's text-encoder and VAE folders. Returns the model config."""
    from sejd.engines.backends import backend as find_backend
    from sejd.engines.manifest import engine_dir
    from sejd.serve.service import served_plans
    from sejd.workflows.source import (
        Session,
        is_bundle,
        open_source,
        refuse_config_for_bundle,
    )

    refuse_config_for_bundle(source, config)
    if not is_bundle(source):
        src = open_source(source, backend, config=config)
        check_extras(src.model.config, text_encoder, vae)
        served_plans(src)
        return src.model.config
    from sejd.export.bundle import BundleError, load_bundle

    bundle = load_bundle(source)
    check_extras(bundle.config, text_encoder, vae)
    backend = "ort-cpu" if backend == "auto" else backend
    found, _ = find_backend(backend)
    found.require()
    name = found.name
    if found.needs_build and not (engine_dir(bundle, name) / "manifest.json").exists():
        raise BundleError(f"{bundle.path}: no {name} engines; build them with `sejd build {bundle.path} "
                          f"--backend {name}`")
    # plans need only the model's config, not its weights
    served_plans(Session(types.SimpleNamespace(config=bundle.config), None, backend, bundle))
    return bundle.config
