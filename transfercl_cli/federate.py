"""`tcl federate`: fine-tune one model across many devices with Flower, the images never leaving any of them.

Flower (`flwr`, the optional extra `federated`) carries the rounds: its gRPC transport, its client manager and its
strategies (FedAvg weighted by example count, FedProx, FedAdam aggregate; tcl does no averaging of its own). tcl
supplies both ends around them:

- client (`tcl federate client RECIPE --server HOST:PORT`): a Flower NumPyClient whose `fit` is tcl's own
  fine-tuning (Session, Trainer, the frozen-prefix feature cache, computed once per device and kept on disk) for
  `federated.local_epochs` on the device's images, starting from the global model it was sent. It returns only the
  arrays that train (the TRAVEL arrays: weights, biases, gamma/beta of the trainable layers, and the running
  statistics of a BatchNorm that trains in batch mode) and scalar metrics; `evaluate` measures the global model on
  the device's test split and returns a loss, a count and an accuracy. No image, feature or label is ever sent.
- server (`tcl federate server RECIPE`): holds the global model, runs the rounds with Flower's strategy, checks
  every result (the arrays, their shapes and finiteness, the recipe digest, the federation token), measures the
  global model on an optional held-out set and writes a run directory of the same shape as `tcl finetune`'s after
  every round (checkpoint.npz as the commit point, best.npz, metrics.jsonl, state.json, model.json/frozen.npz once)
  plus a report per round (rounds/round-NNN.json) and accuracy_per_round.png. `tcl evaluate RUN`, `tcl predict RUN`
  and `tcl export-weights RUN` read it like any run; `--resume` continues after a server restart.

Transport: Flower's gRPC transport (`flwr.server.start_server`'s server and `start_client`'s client, which Flower
1.13+ lists as deprecated in favour of its SuperLink/SuperNode deployment; they are the gRPC path the installed
Flower still offers, in one process per end). TLS is the default (`tcl federate certs DIR` makes a CA, a server
certificate and a federation token); `--insecure` must be asked for. Flower's node authentication exists only on
the SuperLink/SuperNode transport, so tcl authenticates clients itself: with a federation token every result
carries an HMAC over the round's nonce, the recipe digest, the arrays and the metrics, and the server refuses
results without a valid one.
"""
import hashlib
import hmac
import json
import math
import os
import secrets
import socket
import time
import warnings

import numpy as np

from .errors import DataError, RecipeError, TclError
from .fsutil import write_json

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TOKEN = "ca.crt", "ca.key", "server.crt", "server.key", "federation.token"
DEFAULT_PORT = 8080
# What a client's result may carry besides the arrays (all scalars): the server records these and nothing else.
FIT_METRICS = ("client", "train_loss", "train_accuracy", "seconds", "images_per_sec", "local_epochs", "tcl_auth",
               "tcl_refused")
EVALUATE_METRICS = ("client", "accuracy", "split", "tcl_auth", "tcl_refused")
ROUNDS_DIR = "rounds"
ACCURACY_PNG = "accuracy_per_round.png"
GRPC_MAX_MESSAGE = 536_870_912  # Flower's default (512 MiB)


class InsecureWarning(UserWarning):
    """--insecure: printed as a `warning:` line (not a note) by the CLI."""


# -- Flower ---------------------------------------------------------------------------------------------------------
def require_flwr():
    """The flwr module, or a TclError saying how to install it. Flower's telemetry is off unless the user set
    FLWR_TELEMETRY_ENABLED: a device fine-tuning its owner's photos phones home to nobody."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    try:
        import flwr
    except ImportError as e:
        raise TclError(f"`tcl federate` needs Flower (the flwr package), which cannot be imported here ({e}).",
                       "Install it with `pip install 'transfercl[federated]'` (in a clone: `pip install "
                       "'.[federated]'`), or `pip install flwr`.") from None
    return flwr


def quiet_flower(verbose=False):
    """Flower logs every message at INFO (and a deprecation box per start); tcl prints its own lines."""
    import logging

    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)


def _start_client():
    require_flwr()
    try:
        from flwr.compat.client.app import start_client
    except ImportError:  # Flower before 1.20
        from flwr.client import start_client
    return start_client


def _start_grpc_server():
    require_flwr()
    try:
        from flwr.server.superlink.fleet.grpc_bidi.grpc_server import start_grpc_server
    except ImportError:  # Flower before 1.8
        try:
            from flwr.server.fleet.grpc_bidi.grpc_server import start_grpc_server
        except ImportError:
            from flwr.server.grpc_server.grpc_server import start_grpc_server
    return start_grpc_server


# -- TLS and the federation token -----------------------------------------------------------------------------------
def make_certs(out_dir, hosts=(), days=825, force=False):
    """A CA, a server certificate for `hosts` (plus localhost, 127.0.0.1 and ::1) signed by it, and a federation
    token, in `out_dir`. Returns {name: path}. Keys are written 0600."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, TOKEN]
    have = [n for n in names if os.path.exists(os.path.join(out_dir, n))]
    if have and not force:
        raise TclError(f"'{out_dir}' already holds federation files ({', '.join(have)}).",
                       "Use them as they are, pass --force to make new ones (every device then needs the new ca.crt "
                       "and federation.token), or choose another folder.")
    os.makedirs(out_dir, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tcl federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    all_hosts = []
    for h in ["localhost", "127.0.0.1", "::1", *hosts]:
        if h and h not in all_hosts:
            all_hosts.append(h)
    alt = []
    for h in all_hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            alt.append(x509.DNSName(h))
    srv_key = ec.generate_private_key(ec.SECP256R1())
    cn = next((h for h in all_hosts[3:]), "localhost")
    srv = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
           .issuer_name(ca_name).public_key(srv_key.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(start).not_valid_after(end)
           .add_extension(x509.SubjectAlternativeName(alt), critical=False)
           .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
           .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
           .sign(ca_key, hashes.SHA256()))

    def pem(c):
        return c.public_bytes(serialization.Encoding.PEM)

    def key_pem(k):
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    out = {}
    for name, data, private in ((CA_CERT, pem(ca), False), (CA_KEY, key_pem(ca_key), True),
                                (SERVER_CERT, pem(srv), False), (SERVER_KEY, key_pem(srv_key), True),
                                (TOKEN, (secrets.token_hex(32) + "\n").encode(), True)):
        path = os.path.join(out_dir, name)
        _write_private(path, data, 0o600 if private else 0o644)
        out[name] = path
    out["hosts"] = all_hosts
    out["expires"] = end.strftime("%Y-%m-%d")
    return out


def _write_private(path, data, mode):
    from .fsutil import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)


def _read(path, what, fix):
    if not os.path.isfile(path):
        raise TclError(f"The {what} '{path}' does not exist.", fix)
    with open(path, "rb") as f:
        return f.read()


def _check_pem_cert(path, data, fix):
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as e:
        raise TclError(f"'{path}' is not a PEM certificate ({e}).", fix) from None
    import datetime

    end = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    if end < datetime.datetime.now(datetime.timezone.utc):
        raise TclError(f"The certificate '{path}' expired on {end:%Y-%m-%d}.",
                       "Make new ones with `tcl federate certs DIR --force` and copy ca.crt and federation.token to "
                       "every device again.")
    return cert


def _read_token(path):
    if path is None or not os.path.exists(path):
        return None
    tok = _read(path, "federation token", "").strip()
    if len(tok) < 16:
        raise TclError(f"The federation token '{path}' is too short ({len(tok)} bytes) to authenticate anything.",
                       "Make one with `tcl federate certs DIR`, or delete the file to run without a token.")
    return tok


def server_tls(certs_dir, insecure, log=print):
    """((ca, cert, key) bytes or None, token bytes or None) for the server."""
    fix = (f"Make them with `tcl federate certs {certs_dir or 'DIR'} --host THIS_MACHINES_NAME_OR_IP`, or pass "
           "--insecure to run without TLS (not encrypted; only on a network you trust).")
    if insecure:
        warnings.warn("--insecure: the federation runs without TLS. Model updates travel unencrypted and clients "
                      "cannot tell this server from an impostor; use it only on a network you trust.", InsecureWarning,
                      stacklevel=2)
        return None, (_read_token(os.path.join(certs_dir, TOKEN)) if certs_dir else None)
    if not certs_dir:
        raise TclError("The server needs TLS files (the default): no --certs folder was given.", fix)
    files = [os.path.join(certs_dir, n) for n in (CA_CERT, SERVER_CERT, SERVER_KEY)]
    ca, cert, key = (_read(p, what, fix) for p, what in zip(files, ("CA certificate", "server certificate",
                                                                      "server private key")))
    _check_pem_cert(files[0], ca, fix)
    c = _check_pem_cert(files[1], cert, fix)
    from cryptography.hazmat.primitives import serialization

    try:
        k = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TclError(f"'{files[2]}' is not an unencrypted PEM private key ({e}).", fix) from None
    pub = lambda x: x.public_bytes(serialization.Encoding.PEM,  # noqa: E731
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    if pub(k.public_key()) != pub(c.public_key()):
        raise TclError(f"The server key '{files[2]}' does not belong to the certificate '{files[1]}'.", fix)
    return (ca, cert, key), _read_token(os.path.join(certs_dir, TOKEN))


def client_tls(certs_dir, insecure):
    """(CA certificate bytes or None, token bytes or None) for a client."""
    fix = ("Copy ca.crt (and federation.token) from the folder `tcl federate certs` wrote on the server into a "
           "folder on this device and pass it as --certs, or pass --insecure for a server started with --insecure.")
    if insecure:
        warnings.warn("--insecure: connecting without TLS. Model updates travel unencrypted and this device cannot "
                      "tell the server from an impostor; use it only on a network you trust.", InsecureWarning,
                      stacklevel=2)
        return None, (_read_token(os.path.join(certs_dir, TOKEN)) if certs_dir else None)
    if not certs_dir:
        raise TclError("The client needs the federation's CA certificate for TLS (the default): no --certs folder "
                       "was given.", fix)
    path = os.path.join(certs_dir, CA_CERT)
    ca = _read(path, "CA certificate", fix)
    _check_pem_cert(path, ca, fix)
    return ca, _read_token(os.path.join(certs_dir, TOKEN))


def sign(token, nonce, digest, kind, arrays, metrics, num_examples, loss=None):
    """HMAC-SHA256 of a result under the federation token: the round's nonce, the recipe digest, the arrays (dtype,
    shape, bytes), the scalar metrics and the example count (and loss). A result changed in any way, or made
    without the token, does not verify."""
    h = hmac.new(token, digestmod=hashlib.sha256)
    h.update(json.dumps([nonce, digest, kind, int(num_examples), loss,
                         {k: v for k, v in sorted(metrics.items()) if k != "tcl_auth"}], sort_keys=True).encode())
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- what travels, and the recipe digest ----------------------------------------------------------------------------
def travel_keys(plan):
    """'layer/param' of every array a round carries, in graph order: the trained parameters of the trainable layers
    and the running statistics of a trainable BatchNorm in batch mode (in inference mode they never change). The
    frozen prefix never travels."""
    from .session import PARAM_TRAINED

    keys = []
    for n in plan.graph.nodes:
        if n.name not in plan.trainable:
            continue
        batch_bn = n.op == "batchnorm" and n.attrs.get("bn_mode") == "batch"
        for k in n.params:
            if k in PARAM_TRAINED or batch_bn:
                keys.append(f"{n.name}/{k}")
    return keys


def travel_arrays(plan, keys):
    params = {f"{n.name}/{k}": v for n in plan.graph.nodes for k, v in n.params.items()}
    return [np.ascontiguousarray(params[k], dtype=np.float32) for k in keys]


def travel_spec(plan):
    """{"keys", "shapes", "parameters", "bytes"} of one model update (float32)."""
    keys = travel_keys(plan)
    arrays = travel_arrays(plan, keys)
    return {"keys": keys, "shapes": [list(a.shape) for a in arrays], "parameters": int(sum(a.size for a in arrays)),
            "bytes": int(sum(a.nbytes for a in arrays))}


def federation_digest(recipe, model_graph, classes, pre):
    """What every participant must share for their updates to mean the same thing: the model (structure and
    weights, not its path), the cut, head, freeze/unfreeze, preprocessing, precision, augmentation, the training
    hyperparameters and the class names. Paths, data, output, device, memory budget and the epochs (the server
    sends the rounds and local epochs) may differ from device to device."""
    from .plan import graph_digest

    t = {k: v for k, v in recipe["train"].items()
         if k not in ("epochs", "early_stopping", "cache", "max_memory_mb", "seed")}
    keep = {"model": graph_digest(model_graph), "cut_after": recipe["cut_after"], "head": recipe["head"],
            "freeze": recipe["freeze"], "unfreeze": recipe["unfreeze"], "input": pre.to_dict(),
            "precision": recipe["precision"], "augment": recipe["augment"], "train": t, "classes": list(classes)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def set_plan_meta(plan, model_graph, classes, pre):
    """The model.json meta a Session gives its plan (classes, preprocessing, layers trained now and before)."""
    before = model_graph.meta
    plan.graph.meta.update(classes=list(classes), preprocess=pre.to_dict(),
                           trainable=sorted(plan.trainable | set(before.get("trainable") or [])),
                           new_layers=sorted(set(plan.new) | set(before.get("new_layers") or [])))


def align_classes(session, classes):
    """Make a Session's labels index the federation's class list (a device may hold a subset of the classes, in
    its own sorted order): labels remapped, the plan rebuilt with a head of len(classes) outputs. Returns True when
    anything changed."""
    from .plan import build_plan
    from .session import choose_micro_batch, class_weight_vector

    classes = list(classes)
    have = list(session.classes)
    if have == classes:
        return False
    unknown = [c for c in have if c not in classes]
    if unknown:
        raise DataError(f"The data folder '{session.recipe['data']['root']}' has class folder(s) "
                        f"{', '.join(unknown[:10])} that the federation does not know (its classes: "
                        f"{', '.join(classes[:20])}).",
                        "Rename or remove those folders, or add the classes to federated.classes in the recipe on "
                        "the server and every device (a new class changes the model's head).")
    remap = [classes.index(c) for c in have]
    for s in ("train", "val", "test"):
        session.splits.splits[s] = [(p, remap[y]) for p, y in session.splits[s]]
    session.splits.classes = classes
    session.classes = classes
    session.plan = build_plan(session.model_graph, session.recipe, classes)
    set_plan_meta(session.plan, session.model_graph, classes, session.pre)
    session.class_weights = class_weight_vector(session.recipe["train"]["class_weights"], classes,
                                                session.splits["train"])
    session.micro_batch = choose_micro_batch(session.plan, session.recipe["train"]["batch_size"], session.budget)
    return True


def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def describe_travel(spec, plan, digest):
    total = sum(n.params[k].nbytes for n in plan.graph.nodes for k in n.params)
    return (f"federated  each round carries {len(spec['keys'])} arrays, {spec['parameters']:,} parameters, "
            f"{_human(spec['bytes'])} per direction per client (the model is {_human(total)}; the frozen prefix "
            f"and its feature cache stay on each device): {', '.join(spec['keys'][:8])}"
            f"{', ...' if len(spec['keys']) > 8 else ''}; recipe digest {digest}")


# -- the client -----------------------------------------------------------------------------------------------------
class Refused(Exception):
    """This device will not take part (recipe mismatch, a missing token, the server's rejection)."""


class _Proximal:
    """FedProx's proximal term mu/2 |w - w_global|^2: its gradient mu (w - w_global) added to each step's gradients
    before the recipe's optimizer step."""

    def __init__(self, inner, be, anchor, mu):
        self.inner, self.be, self.anchor, self.mu = inner, be, anchor, mu

    def step(self, params, grads, lr):
        be = self.be
        for k, g in grads.items():
            a = self.anchor.get(f"{k[0]}/{k[1]}")
            if a is None:
                continue
            p = np.asarray(be.to_host(params[k]), np.float32)
            d = be.asarray((self.mu * (p.reshape(-1) - a.reshape(-1))).astype(np.float32).reshape(p.shape))
            be.fn("add_inplace")(be, g, d)
            be.release(d)
        self.inner.step(params, grads, lr)

    def __getattr__(self, name):
        return getattr(self.inner, name)


class FederatedClient:
    """One device: its Session (data, model, plan, device), its feature cache, and what a Flower client does each
    round (`fit`, `evaluate`, `get_parameters`; `to_flower()` wraps them in a flwr NumPyClient)."""

    def __init__(self, recipe, name=None, token=None, log=print, quiet=True):
        from .session import Session

        self.recipe, self.log, self.quiet = recipe, log, quiet
        self.token = token.encode() if isinstance(token, str) else token
        self.name = (name or socket.gethostname() or "client")[:64]
        self.session = Session(recipe, log=lambda *a: None)
        if recipe["federated"]["classes"]:
            align_classes(self.session, recipe["federated"]["classes"])
        self.rejected = None  # the reason, when this device refused or was refused
        self.rounds = []  # one record per round this device trained in
        self.evaluations = []
        self._features()
        self._build()

    # set-up
    def _features(self):
        from .train import compute_prefix_features

        s = self.session
        self.feats = {}
        if not s.plan.use_cache:
            return
        items = s.splits["train"] + s.splits["val"] + s.splits["test"]
        data, rows, ok, cache = compute_prefix_features(s, items, quiet=self.quiet)
        off = 0
        for name in ("train", "val", "test"):
            n = len(s.splits[name])
            self.feats[name] = (data, rows[off:off + n], ok[off:off + n])
            off += n
        self.log(f"cache      {cache.hits} hits, {cache.misses} computed in {cache.compute_seconds:.1f} s (the frozen "
                 "prefix runs once per image on this device, never per round)")

    def _build(self):
        from .train import Source, Trainer

        s = self.session
        self.keys = travel_keys(s.plan)
        self.spec = travel_spec(s.plan)
        self.digest = federation_digest(s.recipe, s.model_graph, s.classes, s.pre)
        self.close()
        self.trainer = Trainer(s)
        self.src = {n: Source(s, s.splits[n], self.feats.get(n), augment=(n == "train"), shuffle=(n == "train"))
                    for n in ("train", "val", "test")}

    def close(self):
        for so in getattr(self, "src", {}).values():
            if so.loader is not None:
                so.loader.close()

    def describe(self):
        return self.session.describe() + "\n" + describe_travel(self.spec, self.session.plan, self.digest)

    # the round's checks
    def _accept(self, config, kind):
        if config.get("tcl_rejected"):
            self.rejected = str(config["tcl_rejected"])
            raise Refused(self.rejected)
        classes = config.get("tcl_classes")
        if classes:
            try:
                classes = json.loads(classes)
            except ValueError:
                classes = None
            if isinstance(classes, list) and classes != self.session.classes:
                try:
                    if align_classes(self.session, classes):
                        self._build()
                except DataError as e:
                    self._refuse(str(e))
        want = config.get("tcl_digest")
        if want != self.digest:
            self._refuse(f"The recipe on this device does not match the server's (recipe digest {self.digest} here, "
                         f"{want} on the server): the model file, cut_after, head, freeze/unfreeze, input, precision, "
                         "augment, train settings (except epochs) or class names differ. Use the same recipe and "
                         "model file as the server (only data, output, device and train.max_memory_mb may differ).")
        if config.get("tcl_auth") and not self.token:
            self._refuse("The server requires the federation token and this device has none: copy "
                         "federation.token from the server's certs folder into this device's --certs folder.")
        names = config.get("tcl_params")
        if names and json.loads(names) != self.keys:
            self._refuse("The server sends other arrays than this device trains (a tcl version or recipe mismatch).")

    def _refuse(self, reason):
        self.rejected = reason
        raise Refused(reason)

    def _refusal(self, kind):
        m = {"client": self.name, "tcl_refused": self.rejected[:500]}
        return ([], 0, m) if kind == "fit" else (0.0, 0, m)

    def _load(self, parameters):
        from .rundir import load_params_into

        if len(parameters) != len(self.keys):
            self._refuse(f"The server sent {len(parameters)} arrays; this device trains {len(self.keys)}.")
        arrays = {}
        for k, a, shape in zip(self.keys, parameters, self.spec["shapes"]):
            a = np.asarray(a, dtype=np.float32)
            if list(a.shape) != list(shape) or not np.isfinite(a).all():
                self._refuse(f"The server sent '{k}' as {a.shape} (expected {tuple(shape)}) or with non-finite "
                             "values.")
            arrays[k] = a
        load_params_into(self.session.plan.graph, arrays)
        return arrays

    def get_parameters(self, config=None):
        return travel_arrays(self.session.plan, self.keys)

    # a round
    def fit(self, parameters, config):
        """Train from the global arrays for the round's local epochs; returns (arrays, examples, scalar metrics)."""
        from .callbacks import nonfinite_params
        from .train import NonFinite, Optimizer, lr_at

        try:
            self._accept(config, "fit")
            anchor = self._load(parameters)
        except Refused:
            return self._refusal("fit")
        s, tr = self.session, self.trainer
        rnd, rounds = int(config.get("tcl_round", 1)), int(config.get("tcl_rounds", 1))
        epochs = int(config.get("tcl_local_epochs", s.recipe["federated"]["local_epochs"]))
        t = dict(s.recipe["train"], epochs=max(1, rounds * epochs))  # schedules run across the whole federation
        for st in tr.opt.state.values():
            for v in st.values():
                if not isinstance(v, (int, float)):
                    s.be.release(v)
        tr.opt = Optimizer(s.be, t)  # a fresh optimizer state each round, from the global model
        mu = float(config.get("proximal_mu", 0.0) or 0.0)
        if mu > 0:
            tr.opt = _Proximal(tr.opt, s.be, anchor, mu)
        src = self.src["train"]
        self.log(f"round {rnd}/{rounds}: training {epochs} local epoch(s) on {len(src)} images")
        t0 = time.perf_counter()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        for e in range(epochs):
            ep = (rnd - 1) * epochs + e
            lr = lr_at(t, ep)
            for step, (x, y, _) in enumerate(src.batches(ep, t["batch_size"])):
                try:
                    loss, correct = tr.step(x, y, lr, ep * 100003 + step)
                except NonFinite as err:
                    self.rejected = (f"Training diverged on this device in round {rnd}: {err.what} became "
                                     f"{err.value}. Lower train.lr in the recipe (on the server and every device: it "
                                     "is part of the recipe digest), or set train.clip_grad_norm.")
                    return self._refusal("fit")
                tot_loss += loss * len(y)
                tot_correct += correct
                tot_n += len(y)
        s.be.finish()
        s.be.sync_params_to_host(tr.graph)
        bad = nonfinite_params(tr.graph, s.plan.trainable)
        if bad:
            self.rejected = (f"Training diverged on this device in round {rnd}: {', '.join(bad[:4])} became "
                             "non-finite. Lower train.lr (on every device and the server: it is part of the recipe).")
            return self._refusal("fit")
        dt = time.perf_counter() - t0
        arrays = self.get_parameters()
        n = len(src)
        metrics = {"client": self.name, "train_loss": float(tot_loss / max(tot_n, 1)),
                   "train_accuracy": float(tot_correct / max(tot_n, 1)), "seconds": round(dt, 3),
                   "images_per_sec": round(tot_n / dt, 1) if dt > 0 else 0.0, "local_epochs": epochs}
        if self.token:
            metrics["tcl_auth"] = sign(self.token, config.get("tcl_nonce", ""), self.digest, "fit", arrays, metrics,
                                       n)
        rec = {"round": rnd, "examples": n, **{k: v for k, v in metrics.items() if k != "tcl_auth"}}
        self.rounds.append(rec)
        self.log(f"round {rnd}/{rounds}: sent {len(arrays)} arrays ({_human(sum(a.nbytes for a in arrays))}): "
                 f"loss {metrics['train_loss']:.4f}, accuracy {metrics['train_accuracy']:.4f}, {dt:.1f} s")
        return arrays, n, metrics

    def evaluate(self, parameters, config):
        """The global model on this device's test split (else its validation split): (loss, images, metrics)."""
        from .train import predict_source

        try:
            self._accept(config, "evaluate")
            self._load(parameters)
        except Refused:
            return self._refusal("evaluate")
        split = "test" if len(self.src["test"]) else "val"
        rnd = int(config.get("tcl_round", 0))
        probs, y, _ = predict_source(self.trainer, self.src[split], self.session.recipe["train"]["batch_size"])
        n = int(len(y))
        if n:
            acc = float(np.mean(np.argmax(probs, 1) == y))
            loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y], 1e-12, 1.0))))
        else:
            acc, loss = 0.0, 0.0
        loss = float(np.float32(loss))  # Flower's gRPC message carries the loss as a 32-bit float
        metrics = {"client": self.name, "accuracy": acc, "split": split}
        if self.token:
            metrics["tcl_auth"] = sign(self.token, config.get("tcl_nonce", ""), self.digest, "evaluate", [], metrics,
                                       n, loss)
        self.evaluations.append({"round": rnd, "accuracy": acc, "loss": loss, "examples": n, "split": split})
        if n:
            self.log(f"round {rnd}: the global model scores {acc:.4f} on this device's {n} {split} images")
        return loss, n, metrics

    def to_flower(self):
        """This client as a Flower Client (flwr NumPyClient)."""
        require_flwr()
        from flwr.client import NumPyClient

        outer = self

        class TclNumPyClient(NumPyClient):
            def get_parameters(self, config):
                return outer.get_parameters(config)

            def fit(self, parameters, config):
                return outer.fit(parameters, config)

            def evaluate(self, parameters, config):
                return outer.evaluate(parameters, config)

        return TclNumPyClient().to_client()


def _grpc_reason(e):
    code = getattr(e, "code", lambda: None)()
    details = getattr(e, "details", lambda: "")() or str(e)
    return getattr(code, "name", str(code)), details


def run_client(recipe, server, certs=None, insecure=False, name=None, max_wait=120.0, log=print, quiet=True,
               dry_run=False, verbose=False):
    """Take part in a federation until the server ends it. Returns a summary dict; TclError for an unreachable
    server, a TLS failure, a refused device."""
    import grpc

    require_flwr()
    quiet_flower(verbose)
    host, port = parse_address(server, what="--server")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    ca, token = client_tls(certs, insecure)
    client = FederatedClient(recipe, name=name, token=token, log=log, quiet=quiet)
    log(client.describe())
    if dry_run:
        client.close()
        return {"dry_run": True, "digest": client.digest, "travel": client.spec}
    start_client = _start_client()
    deadline = time.monotonic() + max_wait
    seen = 0
    log(f"client     {client.name}: connecting to {address} ({'TLS' if ca else 'no TLS'}"
        f"{', federation token' if token else ''})")
    try:
        while True:
            try:
                start_client(server_address=address, client=client.to_flower(), root_certificates=ca,
                             insecure=ca is None, grpc_max_message_length=GRPC_MAX_MESSAGE)
                break  # the server said goodbye
            except grpc.RpcError as e:
                if client.rejected:
                    break
                code, details = _grpc_reason(e)
                if "handshake" in details.lower() or "ssl" in details.lower() or "certificate" in details.lower():
                    raise TclError(f"The TLS handshake with {address} failed ({details.strip()[:300]}).",
                                   "The server's certificate must be signed by this device's ca.crt and name the "
                                   "host you connect to: copy ca.crt from the server's certs folder again, or make "
                                   "new certificates with `tcl federate certs DIR --host HOST` naming the address "
                                   "in --server (and restart the server with them).") from None
                if len(client.rounds) + len(client.evaluations) > seen:
                    seen = len(client.rounds) + len(client.evaluations)
                    deadline = time.monotonic() + max_wait  # it was working: wait as long again for a restart
                    log(f"client     lost the server ({code}); reconnecting for up to {max_wait:.0f} s")
                if time.monotonic() >= deadline:
                    if seen:
                        raise TclError(f"Lost the server {address} and it did not come back within {max_wait:.0f} s "
                                       f"({code}: {details.strip()[:200]}). This device took part in "
                                       f"{len(client.rounds)} round(s).",
                                       "Restart the server (`tcl federate server RECIPE --resume` continues the "
                                       "run) and this client; raise --max-wait to ride out longer outages.") from None
                    raise TclError(f"The server {address} is unreachable ({code}: {details.strip()[:200]}); "
                                   f"tried for {max_wait:.0f} s.",
                                   "Check that `tcl federate server` is running there, the address and port, and "
                                   "that no firewall blocks the port; raise --max-wait to wait longer.") from None
                time.sleep(min(2.0, max(0.1, deadline - time.monotonic())))
    finally:
        client.close()
    if client.rejected:
        raise TclError(f"This device left the federation: {client.rejected}",
                       "Fix the cause above and start the client again.")
    log(f"client     the server ended the federation; this device trained in {len(client.rounds)} round(s)")
    return {"client": client.name, "rounds": client.rounds, "evaluations": client.evaluations,
            "digest": client.digest, "travel": {k: client.spec[k] for k in ("parameters", "bytes")}}


def parse_address(text, what="--address"):
    """(host, port) of HOST:PORT, [IPv6]:PORT or HOST (default port)."""
    text = (text or "").strip()
    if not text:
        raise TclError(f"{what}: no address given.", "Write HOST:PORT, e.g. 192.168.1.10:8080.")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        host, port = text, str(DEFAULT_PORT)  # a bare IPv6 address
    else:
        host, port = text, str(DEFAULT_PORT)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TclError(f"{what}: '{text}' is not HOST:PORT.", "Write e.g. 192.168.1.10:8080 or [::1]:8080.")
    return host, int(port)


# -- the server -----------------------------------------------------------------------------------------------------
class GlobalModel:
    """What the server holds: the recipe's model, plan and class names, and, with a held-out set, a Session (device,
    splits, feature cache) to measure the global model on. Quacks like a Session for RunDir."""

    def __init__(self, recipe, log=print, quiet=True):
        from .recipe import Recipe

        fed = recipe["federated"]
        self.log, self.quiet = log, quiet
        server_data = recipe.resolve(fed["server_data"]) if fed["server_data"] else None
        rec = Recipe(json.loads(json.dumps(dict(recipe))))
        rec.path, rec.base_dir = recipe.path, recipe.base_dir
        rec["federated"]["server_data"] = server_data
        self.session = None
        if server_data:
            from .session import Session

            rec["data"]["root"] = server_data
            self.recipe = rec
            self.session = Session(rec, log=lambda *a: None)
            self.classes = list(fed["classes"]) or list(self.session.classes)
            align_classes(self.session, self.classes)
            self.model_graph, self.pre, self.plan = self.session.model_graph, self.session.pre, self.session.plan
        else:
            from .plan import build_plan
            from .runfile import load_any_model
            from .session import resolve_preprocess

            if not fed["classes"]:
                raise RecipeError("The server needs the federation's class names and has no data to take them from.",
                                  "Set `federated: {classes: [cat, dog]}` in the recipe (the same on every device), "
                                  "or give the server held-out images: federated.server_data or --data DIR.")
            self.recipe = rec
            self.classes = list(fed["classes"])
            self.model_graph = load_any_model(rec["model"], config=rec["model_config"], input_size=rec["input"]["size"])
            self.pre = resolve_preprocess(rec["input"], self.model_graph)
            self.plan = build_plan(self.model_graph, rec, self.classes)
            set_plan_meta(self.plan, self.model_graph, self.classes, self.pre)
        self.keys = travel_keys(self.plan)
        self.spec = travel_spec(self.plan)
        self.digest = federation_digest(self.recipe, self.model_graph, self.classes, self.pre)
        self.trainer = self.test_src = None

    def describe(self):
        if self.session is not None:
            text = self.session.describe()
        else:
            p = self.plan
            text = (f"model      {self.recipe['model']} ({len(self.model_graph.nodes)} layers)\n"
                    f"classes    {', '.join(self.classes)} (federated.classes; no server data: the global model is "
                    "measured on the clients' test splits only)\n"
                    f"trainable  {', '.join(n.name for n in p.graph.nodes if n.name in p.trainable)}")
        return text + "\n" + describe_travel(self.spec, self.plan, self.digest)

    def arrays(self):
        return travel_arrays(self.plan, self.keys)

    def load(self, arrays):
        from .rundir import load_params_into

        load_params_into(self.plan.graph, dict(zip(self.keys, arrays)))

    def measure(self):
        """(accuracy, loss, images, probs, labels, paths) of the current global model on the server's test split,
        or None without server data."""
        if self.session is None:
            return None
        from .train import Source, Trainer, compute_prefix_features, predict_source

        s = self.session
        if self.test_src is None:
            items = s.splits["test"]
            if not items:
                raise DataError(f"The server's data '{s.recipe['data']['root']}' has no test split to measure the "
                                "global model on.", "Raise data.test, or give it a test/ folder.")
            feats = None
            if s.plan.use_cache:
                data, rows, ok, _ = compute_prefix_features(s, items, quiet=self.quiet)
                feats = (data, rows, ok)
            self.test_src = Source(s, items, feats)
            self.trainer = Trainer(s)
        probs, y, paths = predict_source(self.trainer, self.test_src, s.recipe["train"]["batch_size"])
        n = len(y)
        if not n:
            return None
        acc = float(np.mean(np.argmax(probs, 1) == y))
        loss = float(-np.mean(np.log(np.clip(probs[np.arange(n), y], 1e-12, 1.0))))
        return acc, loss, n, probs, y, paths

    def close(self):
        if self.test_src is not None and self.test_src.loader is not None:
            self.test_src.loader.close()


class _StrategyState:
    """The strategy's own state for checkpoint.npz (FedAdam's moments; nothing for FedAvg/FedProx)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def state_arrays(self):
        out = {"__t": np.array(0)}
        for name in ("m_t", "v_t"):
            for i, a in enumerate(getattr(self.strategy, name, None) or []):
                out[f"{name}/{i}"] = np.asarray(a)
        return out

    def load_state(self, arrays):
        for name in ("m_t", "v_t"):
            vals = [arrays[k] for k in sorted((k for k in arrays if k.startswith(name + "/")),
                                              key=lambda k: int(k.rsplit("/", 1)[1]))]
            if vals and hasattr(self.strategy, name):
                setattr(self.strategy, name, vals)


def make_strategy(fed, initial, fit_config, evaluate_config, min_clients):
    """Flower's strategy the recipe names, from the global arrays."""
    require_flwr()
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAdam, FedAvg, FedProx

    common = dict(fraction_fit=fed["fraction_fit"], fraction_evaluate=fed["fraction_evaluate"],
                  min_fit_clients=min_clients, min_evaluate_clients=min_clients, min_available_clients=min_clients,
                  on_fit_config_fn=fit_config, on_evaluate_config_fn=evaluate_config, accept_failures=True,
                  initial_parameters=ndarrays_to_parameters(initial))
    if fed["strategy"] == "fedprox":
        return FedProx(proximal_mu=fed["proximal_mu"], **common)
    if fed["strategy"] == "fedadam":
        return FedAdam(eta=fed["server_lr"], **common)
    return FedAvg(**common)


def _tensor_bytes(parameters):
    return int(sum(len(t) for t in parameters.tensors))


class FederatedServer:
    """The server's rounds, built from Flower's pieces (client manager, strategy, fit_clients/evaluate_clients), with
    tcl's checks and run directory around each round."""

    def __init__(self, gm, run, progress, token=None, log=print, rounds=None):
        require_flwr()
        from flwr.server import SimpleClientManager

        self.gm, self.run, self.progress, self.log = gm, run, progress, log
        self.token = token.encode() if isinstance(token, str) else token
        fed = gm.recipe["federated"]
        self.fed = fed
        self.rounds = rounds or fed["rounds"]
        self.min_clients = fed["min_clients"]
        wait = fed["client_wait"]

        class _Clients(SimpleClientManager):
            """Flower's client manager, waiting client_wait seconds (not Flower's day) for enough clients."""

            def wait_for(self, num_clients, timeout=None):
                return super().wait_for(num_clients, timeout=wait if timeout is None else timeout)

        self.clients = _Clients()
        self.nonces = {}
        self.strategy = make_strategy(fed, gm.arrays(), self._fit_config, self._evaluate_config, self.min_clients)
        self.opt_state = _StrategyState(self.strategy)
        if progress.optimizer:
            self.opt_state.load_state(progress.optimizer)
        self.grpc = None

    # the instructions
    def _config(self, rnd, kind):
        nonce = secrets.token_hex(16)
        self.nonces[(rnd, kind)] = nonce
        return {"tcl_round": rnd, "tcl_rounds": self.rounds, "tcl_local_epochs": self.fed["local_epochs"],
                "tcl_digest": self.gm.digest, "tcl_classes": json.dumps(self.gm.classes),
                "tcl_params": json.dumps(self.gm.keys), "tcl_nonce": nonce, "tcl_auth": bool(self.token)}

    def _fit_config(self, rnd):
        return self._config(rnd, "fit")

    def _evaluate_config(self, rnd):
        return self._config(rnd, "evaluate")

    # serving
    def listen(self, address, tls):
        host, port = parse_address(address)
        bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        start = _start_grpc_server()
        try:
            self.grpc = start(client_manager=self.clients, server_address=bind, certificates=tls,
                              max_message_length=GRPC_MAX_MESSAGE)
        except SystemExit as e:  # Flower exits on a port in use
            raise TclError(f"Cannot listen on {bind}: {e}.",
                           "Another server (or another program) uses that port: stop it, or choose another port "
                           "with --address HOST:PORT.") from None
        except RuntimeError as e:
            raise TclError(f"Cannot listen on {bind}: {e}.", "Check the address (an address of this machine, or "
                           "0.0.0.0 for all) and the port.") from None
        self.address = getattr(self.grpc, "bound_address", bind)
        return self.address

    def stop(self, goodbye=True):
        if self.grpc is None:
            return
        if goodbye:
            self._disconnect(list(self.clients.all().values()))
        self.grpc.stop(grace=1)
        self.grpc = None

    def _disconnect(self, proxies, rnd=0):
        from flwr.common import ReconnectIns

        for p in proxies:
            try:
                p.reconnect(ReconnectIns(seconds=None), timeout=10, group_id=rnd)
            except Exception:  # noqa: BLE001 - a client gone already needs no goodbye
                pass

    def _reject(self, proxy, rnd, reason):
        """Tell a client why its result was refused (as a fit instruction it answers with a refusal), then let it
        go."""
        from flwr.common import FitIns, ndarrays_to_parameters

        try:
            proxy.fit(FitIns(ndarrays_to_parameters([]), {"tcl_rejected": reason, "tcl_round": rnd}), timeout=10,
                      group_id=rnd)
        except Exception:  # noqa: BLE001
            pass
        self._disconnect([proxy], rnd)

    def _check(self, rnd, kind, proxy, res):
        """None when a result is acceptable, else the reason it is not."""
        from flwr.common import parameters_to_ndarrays

        m = dict(res.metrics or {})
        if m.get("tcl_refused"):
            return f"the client refused: {m['tcl_refused']}"
        arrays = []
        if kind == "fit":
            arrays = parameters_to_ndarrays(res.parameters)
            if len(arrays) != len(self.gm.keys):
                return f"it sent {len(arrays)} arrays, not the {len(self.gm.keys)} trainable ones"
            for k, a, shape in zip(self.gm.keys, arrays, self.gm.spec["shapes"]):
                if list(a.shape) != list(shape) or a.dtype != np.float32:
                    return f"it sent '{k}' as {a.dtype} {tuple(a.shape)}, not float32 {tuple(shape)}"
                if not np.isfinite(a).all():
                    return f"its '{k}' holds non-finite values"
            if res.num_examples <= 0:
                return "it trained on no images"
        if self.token:
            want = sign(self.token, self.nonces.get((rnd, kind), ""), self.gm.digest, kind, arrays, m,
                        res.num_examples, None if kind == "fit" else float(np.float32(res.loss)))
            if not hmac.compare_digest(str(m.get("tcl_auth", "")), want):
                return "its federation token does not verify (a device without this federation's token)"
        return None

    def _client_record(self, proxy, res, kind, ins_bytes, status, reason=None):
        m = dict(res.metrics or {}) if res is not None else {}
        allowed = FIT_METRICS if kind == "fit" else EVALUATE_METRICS
        rec = {"cid": proxy.cid if proxy is not None else None, "client": m.get("client"), "status": status,
               "num_examples": int(res.num_examples) if res is not None else 0,
               "metrics": {k: v for k, v in m.items() if k in allowed and k not in ("client", "tcl_auth")},
               "bytes_sent": ins_bytes,
               "bytes_received": _tensor_bytes(res.parameters) if (res is not None and kind == "fit") else 0}
        if kind == "evaluate" and res is not None:
            rec["loss"] = float(res.loss)
        if reason:
            rec["reason"] = reason
        return rec

    def _wait(self, need, rnd):
        if self.clients.num_available() >= need:
            return
        self.log(f"round {rnd}/{self.rounds}: waiting for {need} client(s) ({self.clients.num_available()} "
                 f"connected; up to {self.fed['client_wait']:.0f} s)")
        if not self.clients.wait_for(need, timeout=self.fed["client_wait"]):
            raise TclError(f"Round {rnd}: only {self.clients.num_available()} of the {need} clients needed "
                           f"connected within {self.fed['client_wait']:.0f} s (federated.client_wait).",
                           f"Start more `tcl federate client` devices (pointing at {self.address}), lower "
                           "federated.min_clients, or raise federated.client_wait; `tcl federate server RECIPE "
                           "--resume` continues from the last finished round.")

    def fit_round(self, rnd):
        from flwr.common import parameters_to_ndarrays
        from flwr.server.server import fit_clients

        t0 = time.perf_counter()
        params = self.strategy_parameters
        instructions = self.strategy.configure_fit(server_round=rnd, parameters=params,
                                                   client_manager=self.clients)
        if not instructions:
            raise TclError(f"Round {rnd}: fewer than {self.min_clients} clients stayed connected to train.",
                           "Start more clients or lower federated.min_clients; --resume continues the run.")
        sent = {ins_c.cid: _tensor_bytes(ins.parameters) for ins_c, ins in instructions}
        self.log(f"round {rnd}/{self.rounds}: sent the global model to {len(instructions)} client(s)")
        results, failures = fit_clients(client_instructions=instructions, max_workers=None,
                                        timeout=self.fed["round_timeout"], group_id=rnd)
        clients, ok = [], []
        answered = set()
        for proxy, res in results:
            answered.add(proxy.cid)
            reason = self._check(rnd, "fit", proxy, res)
            if reason:
                clients.append(self._client_record(proxy, res, "fit", sent.get(proxy.cid, 0), "refused", reason))
                self.log(f"round {rnd}/{self.rounds}: result of {res.metrics.get('client') or proxy.cid} refused: "
                         f"{reason}")
                if not (res.metrics or {}).get("tcl_refused"):
                    self._reject(proxy, rnd, f"The server refused this device's result: {reason}.")
                else:
                    self._disconnect([proxy], rnd)
                failures.append(RuntimeError(reason))
            else:
                clients.append(self._client_record(proxy, res, "fit", sent.get(proxy.cid, 0), "ok"))
                ok.append((proxy, res))
        for proxy, _ in instructions:
            if proxy.cid not in answered:
                clients.append({"cid": proxy.cid, "client": None, "status": "failed", "num_examples": 0,
                                "metrics": {}, "bytes_sent": sent.get(proxy.cid, 0), "bytes_received": 0,
                                "reason": "no result: disconnected, killed, or past federated.round_timeout"})
        rec = {"round": rnd, "clients": clients, "results": len(ok), "failures": len(instructions) - len(ok),
               "bytes_sent": sum(sent.values()), "bytes_received": sum(c["bytes_received"] for c in clients)}
        if len(ok) < self.min_clients:
            rec["status"] = "failed"
            rec["reason"] = (f"only {len(ok)} of {len(instructions)} clients returned a usable result; "
                             f"federated.min_clients is {self.min_clients}: the global model is unchanged")
            self.log(f"round {rnd}/{self.rounds}: {rec['reason']}")
        else:
            new, _ = self.strategy.aggregate_fit(rnd, ok, failures)
            arrays = parameters_to_ndarrays(new) if new is not None else None
            if arrays is None or not all(np.isfinite(a).all() for a in arrays):
                rec["status"] = "failed"
                rec["reason"] = "the aggregated model is not finite: the global model is unchanged"
            else:
                rec["status"] = "ok"
                self.strategy_parameters = new
                self.gm.load([np.asarray(a, np.float32) for a in arrays])
        n = sum(res.num_examples for _, res in ok)
        if n:
            rec["train_loss"] = float(sum(res.num_examples * float(res.metrics.get("train_loss", 0)) for _, res in ok) / n)
            rec["train_accuracy"] = float(sum(res.num_examples * float(res.metrics.get("train_accuracy", 0))
                                              for _, res in ok) / n)
        rec["train_examples"] = int(n)
        rec["fit_seconds"] = round(time.perf_counter() - t0, 3)
        return rec

    def evaluate_round(self, rnd):
        """Federated evaluation: the global model on the sampled clients' test splits (example-weighted)."""
        from flwr.server.server import evaluate_clients

        if not self.fed["fraction_evaluate"]:
            return None
        if self.clients.num_available() < self.min_clients:  # Flower's sampling would wait client_wait for them
            self.log(f"round {rnd}/{self.rounds}: {self.clients.num_available()} client(s) connected, fewer than "
                     f"min_clients: no federated evaluation this round")
            return None
        instructions = self.strategy.configure_evaluate(server_round=rnd, parameters=self.strategy_parameters,
                                                        client_manager=self.clients)
        if not instructions:
            return None
        sent = {p.cid: _tensor_bytes(ins.parameters) for p, ins in instructions}
        results, _ = evaluate_clients(client_instructions=instructions, max_workers=None,
                                      timeout=self.fed["round_timeout"], group_id=rnd)
        clients, ok, answered = [], [], set()
        for proxy, res in results:
            answered.add(proxy.cid)
            reason = self._check(rnd, "evaluate", proxy, res)
            clients.append(self._client_record(proxy, res, "evaluate", sent.get(proxy.cid, 0),
                                               "refused" if reason else "ok", reason))
            if reason:
                self.log(f"round {rnd}/{self.rounds}: evaluation of {res.metrics.get('client') or proxy.cid} "
                         f"refused: {reason}")
                if (res.metrics or {}).get("tcl_refused"):
                    self._disconnect([proxy], rnd)
                else:
                    self._reject(proxy, rnd, f"The server refused this device's result: {reason}.")
            elif res.num_examples > 0:
                ok.append(res)
        for proxy, _ in instructions:
            if proxy.cid not in answered:
                clients.append({"cid": proxy.cid, "client": None, "status": "failed", "num_examples": 0,
                                "metrics": {}, "bytes_sent": sent.get(proxy.cid, 0), "bytes_received": 0,
                                "reason": "no result"})
        n = sum(r.num_examples for r in ok)
        out = {"clients": clients, "bytes_sent": sum(sent.values()), "num_examples": int(n)}
        if n:
            out["accuracy"] = float(sum(r.num_examples * float(r.metrics.get("accuracy", 0)) for r in ok) / n)
            out["loss"] = float(sum(r.num_examples * float(r.loss) for r in ok) / n)
        return out

    def serve(self):
        """The remaining rounds; commits each one. Returns the history."""
        from flwr.common import ndarrays_to_parameters

        p, gm = self.progress, self.gm
        self.strategy_parameters = ndarrays_to_parameters(gm.arrays())
        first = p.start_epoch + 1
        for rnd in range(first, self.rounds + 1):
            start = time.perf_counter()
            # The run's first round waits for federated.start_clients; later ones (and a resumed run) for min_clients.
            need = (self.fed["start_clients"] or self.min_clients) if rnd == 1 else self.min_clients
            self._wait(max(need, self.min_clients), rnd)
            rec = self.fit_round(rnd)
            g = gm.measure()
            if g is not None:
                rec["global"] = {"accuracy": g[0], "loss": g[1], "num_samples": g[2], "source": "server test split"}
            fe = self.evaluate_round(rnd)
            if fe is not None:
                rec["federated_evaluation"] = fe
                rec["bytes_sent"] += fe["bytes_sent"]
            rec["seconds"] = round(time.perf_counter() - start, 3)
            self.commit(rnd, rec)
        return p.history

    def commit(self, rnd, rec):
        """One finished round into the run directory: checkpoint.npz (the commit point, as a finetune epoch), best.npz
        when it is the best, metrics.jsonl, rounds/round-NNN.json, accuracy_per_round.png, state.json."""
        from .rundir import trainable_arrays

        p, run, gm = self.progress, self.run, self.gm
        acc_src = rec.get("global") or rec.get("federated_evaluation") or {}
        line = {"epoch": rnd, "round": rnd, "status": rec["status"], "clients": rec["results"],
                "failures": rec["failures"], "train_examples": rec["train_examples"],
                "train_loss": rec.get("train_loss"), "train_accuracy": rec.get("train_accuracy"),
                "val_loss": acc_src.get("loss"), "val_accuracy": acc_src.get("accuracy"),
                "global_accuracy": (rec.get("global") or {}).get("accuracy"),
                "federated_accuracy": (rec.get("federated_evaluation") or {}).get("accuracy"),
                "bytes_sent": rec["bytes_sent"], "bytes_received": rec["bytes_received"], "seconds": rec["seconds"]}
        line = {k: v for k, v in line.items() if v is not None}
        p.history.append(line)
        improved = False
        if "val_accuracy" in line and rec["status"] == "ok" and (p.best is None or line["val_accuracy"] > p.best["value"]):
            p.best = {"epoch": rnd, "value": line["val_accuracy"], "metric": "val_accuracy"}
            p.best_params = trainable_arrays(gm.plan.graph, gm.plan.trainable)
            improved = True
        run.commit_epoch(gm, self.opt_state, rnd - 1, p)
        if improved:
            run.write_best(p.best_params)
        run.append_metrics(line)
        doc = dict(rec, strategy=self.fed["strategy"], digest=gm.digest,
                   parameters={"keys": gm.keys, "shapes": gm.spec["shapes"], "bytes": gm.spec["bytes"]},
                   generated_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        write_json(os.path.join(run.path, ROUNDS_DIR, f"round-{rnd:03d}.json"), _finite(doc))
        write_accuracy_png(os.path.join(run.path, ACCURACY_PNG), p.history)
        run.state("training", p, self.rounds)
        g = rec.get("global")
        fe = rec.get("federated_evaluation")
        parts = [f"round {rnd}/{self.rounds}: {rec['results']} client(s)"
                 + (f" ({rec['failures']} failed)" if rec["failures"] else "")]
        if "train_loss" in rec:
            parts.append(f"train loss {rec['train_loss']:.4f} acc {rec['train_accuracy']:.4f}")
        if g:
            parts.append(f"global acc {g['accuracy']:.4f} on {g['num_samples']} server images")
        if fe and "accuracy" in fe:
            parts.append(f"clients' test acc {fe['accuracy']:.4f} on {fe['num_examples']} images")
        parts.append(f"sent {_human(rec['bytes_sent'])}, received {_human(rec['bytes_received'])}, "
                     f"{rec['seconds']:.1f} s" + ("" if rec["status"] == "ok" else "  [round failed]"))
        self.log("  ".join(parts))


def _finite(v):
    from .fsutil import jsonable

    return jsonable(v, finite=True)


def run_server(recipe, address="0.0.0.0:8080", certs=None, insecure=False, resume=False, force=False, log=print,
               quiet=True, dry_run=False, verbose=False, on_listening=None):
    """Serve the federation the recipe describes until its last round; returns a summary dict."""
    from .rundir import RunDir, trainable_arrays

    require_flwr()
    quiet_flower(verbose)
    t_start = time.perf_counter()
    tls, token = server_tls(certs, insecure) if not dry_run else (None, None)  # before any work: cron fails fast
    gm = GlobalModel(recipe, log=log, quiet=quiet)
    log(gm.describe())
    fed = gm.recipe["federated"]
    log(f"server     {fed['rounds']} rounds of {fed['local_epochs']} local epoch(s), {fed['strategy']}, at least "
        f"{fed['min_clients']} client(s) per round (fraction {fed['fraction_fit']:g})")
    if dry_run:
        return {"dry_run": True, "digest": gm.digest, "travel": gm.spec, "classes": gm.classes}
    if fed["start_clients"] and fed["start_clients"] < fed["min_clients"]:
        raise RecipeError("Recipe key 'federated.start_clients' is below federated.min_clients.",
                          "Leave it out, or make it at least min_clients.")
    run = RunDir(gm.recipe["output"])
    run.check_not_an_input(gm.recipe, resume)
    with run.lock():
        progress = run.prepare(gm, resume, force, log)
        if resume and progress.history:
            log(f"resume     from round {progress.epochs_finished} of {fed['rounds']}")
        if progress.epochs_finished >= fed["rounds"]:
            raise TclError(f"The federated run in '{run.path}' has finished all {fed['rounds']} rounds.",
                           "Raise federated.rounds to continue it with --resume, or start a new one with --force.")
        srv = FederatedServer(gm, run, progress, token=token, log=log)
        try:
            run.state("training", progress, fed["rounds"])
            run.write_start(gm)
            run.reset_metrics(progress.history)
            if not progress.history:
                g = gm.measure()
                if g is not None:
                    progress.initial = g[0]
                    log(f"before     global accuracy {g[0]:.4f} on {g[2]} server test images (the untrained head)")
            where = srv.listen(address, tls)
            log(f"server     listening on {where} ({'TLS' if tls else 'no TLS'}"
                f"{', federation token required' if token else ''})")
            if on_listening:
                on_listening(where)
            srv.serve()
        except BaseException as e:
            state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            try:
                srv.stop(goodbye=False)
                run.state(state, progress, fed["rounds"], detail=str(e))
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
            if isinstance(e, KeyboardInterrupt):
                from .train import Interrupted

                k = progress.epochs_finished
                if not k:
                    raise Interrupted(f"Interrupted before the first round finished; {run.path} holds no global "
                                      "model yet.", "Start the server again with --force.") from None
                raise Interrupted(f"Interrupted in round {k + 1}. The global model of round {k} is in {run.path}.",
                                  "Continue with `tcl federate server RECIPE --resume`; the clients reconnect "
                                  "within their --max-wait.") from None
            raise
        srv.stop(goodbye=True)
        history = progress.history
        if not any(h.get("status") == "ok" for h in history):
            run.state("failed", progress, fed["rounds"], detail="no round produced a global model")
            raise TclError("No round of the federation produced a global model (every round had fewer usable "
                           "results than federated.min_clients).", "See rounds/ in the run directory for why.")
        run.write_final(gm)
        if progress.best is None:
            run.write_best(trainable_arrays(gm.plan.graph, gm.plan.trainable))
        metrics, meta = None, {"model": gm.recipe["model"], "run_dir": os.path.abspath(run.path),
                               "federated": {"rounds": len(history), "strategy": fed["strategy"],
                                             "digest": gm.digest, "travel_bytes": gm.spec["bytes"]},
                               "initial_accuracy": progress.initial, "train_seconds":
                                   round(time.perf_counter() - t_start, 1)}
        if gm.session is not None:
            from .report import compute_metrics, write_report
            from .rundir import load_params_into

            if progress.best_params:
                load_params_into(gm.plan.graph, progress.best_params)
            g = gm.measure()
            if g is not None:
                acc, loss, n, probs, y, paths = g
                metrics = compute_metrics(y, np.argmax(probs, 1), probs, gm.classes, paths=paths)
                best = progress.best
                meta.update(split="test", weights=f"best (round {best['epoch']}, accuracy {best['value']:.4f})"
                            if best else "final", device=gm.session.be.rt.info.name
                            if hasattr(gm.session.be, "rt") else "numpy")
                write_report(run.path, metrics, meta, history=history)
        gm.close()
        run.finished(progress, fed["rounds"])
    log(f"run directory: {os.path.abspath(run.path)}")
    return {"run_dir": run.path, "rounds": history, "metrics": metrics, "meta": meta}


# -- the accuracy-per-round plot ------------------------------------------------------------------------------------
def write_accuracy_png(path, history):
    """accuracy_per_round.png: the global model's accuracy (server test split, clients' test splits) and the clients'
    training accuracy, per round."""
    from PIL import Image, ImageDraw

    from .fsutil import atomic_path
    from .report import (_AXIS, _GRID, _TRAIN_COLOR, _VAL_COLOR, _font, _marker, _nice_ticks, _text, _text_rot90,
                         _tick_label)

    series = [("global (server test split)", "global_accuracy", _VAL_COLOR, "square"),
              ("global (clients' test splits)", "federated_accuracy", (44, 160, 44), "diamond"),
              ("clients' training", "train_accuracy", _TRAIN_COLOR, "circle")]
    pts = {key: [(h["round"], h[key]) for h in history if isinstance(h.get(key), (int, float))
                 and math.isfinite(h[key])] for _, key, _, _ in series}
    w, h = 760, 460
    ml, mr, mt, mb = 78, 24, 96, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    _text(d, (w // 2, 14), "Accuracy per round", _font(20), anchor="mt")
    x0, y0, x1, y1 = ml, mt, w - mr, h - mb
    lx = x0
    lf, kf = _font(14), _font(12)
    for name, key, color, marker in series:
        if pts[key]:
            d.line((lx, y0 - 26, lx + 26, y0 - 26), fill=color, width=3)
            _marker(d, lx + 13, y0 - 26, color, "square" if marker == "square" else "circle")
            _text(d, (lx + 32, y0 - 26), name, lf, anchor="lm")
            lx += 32 + int(d.textlength(name, font=lf)) + 20
    d.rectangle((x0, y0, x1, y1), outline=_AXIS)
    allp = [p for v in pts.values() for p in v]
    if not allp:
        _text(d, ((x0 + x1) / 2, (y0 + y1) / 2), "no accuracy measured yet", lf, anchor="mm")
    else:
        ylo, yhi, yticks, ystep = _nice_ticks(max(0.0, min(y for _, y in allp) - 0.02),
                                              min(1.0, max(y for _, y in allp) + 0.02))
        xs = [x for x, _ in allp]
        xlo, xhi = min(xs) - 0.5, max(xs) + 0.5

        def px(x):
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

        def py(y):
            return y1 - (y - ylo) / ((yhi - ylo) or 1) * (y1 - y0)

        for t in yticks:
            d.line((x0 + 1, py(t), x1 - 1, py(t)), fill=_GRID)
            _text(d, (x0 - 8, py(t)), _tick_label(t, ystep), kf, anchor="rm")
        step = max(1, int(math.ceil((max(xs) - min(xs) + 1) / 12)))
        for r in range(int(min(xs)), int(max(xs)) + 1, step):
            d.line((px(r), y1, px(r), y1 + 5), fill=_AXIS)
            _text(d, (px(r), y1 + 8), str(r), kf, anchor="mt")
        d.rectangle((x0, y0, x1, y1), outline=_AXIS)
        _text_rot90(img, (x0 - 58, (y0 + y1) / 2), "accuracy", lf)
        for name, key, color, marker in series:
            xy = [(px(x), py(y)) for x, y in pts[key]]
            if len(xy) > 1:
                d.line(xy, fill=color, width=3)
            for xx, yy in xy:
                _marker(d, xx, yy, color, "square" if marker == "square" else "circle")
    _text(d, ((x0 + x1) / 2, y1 + 30), "round", lf, anchor="mt")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)

