"""Test-only PKI: a CA and the classic broken certificates, generated at test time.

`make_pki(dir)` writes PEM files (EC P-256 keys: milliseconds, not seconds) and returns
their paths; `server_context(pair)` turns one pair into a server-side SSLContext for
`diagnostics.faults.FaultServer(ssl=...)`. The session-scoped `pki` fixture generates
once; import it where needed: `from tests.tlsutil import pki  # noqa: F401`.

    good             SAN DNS:localhost, IP:127.0.0.1, signed by `ca`, valid now
    expired          same names, signed by `ca`, notAfter a day ago
    wrong_name       SAN DNS:other.example only, signed by `ca`
    self_signed      SAN DNS:localhost, IP:127.0.0.1, signed by its own key
    other_ca_signed  SAN DNS:localhost, IP:127.0.0.1, signed by a second CA nobody trusts
                     (its certificate is not written: nothing should be able to trust it)

`cryptography` is a test-only dependency (pyproject.toml, extra "test").
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class CertPair:
    cert: Path   # PEM certificate (the leaf only)
    key: Path    # PEM private key (PKCS#8, unencrypted)


@dataclass(frozen=True)
class TestPKI:
    __test__ = False   # not a test class, even when imported into a test module

    ca: Path                   # CA certificate (PEM) that signed good/expired/wrong_name
    good: CertPair
    expired: CertPair
    wrong_name: CertPair
    self_signed: CertPair
    other_ca_signed: CertPair


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gatewise tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(names: tuple[str, ...]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class _Authority:
    """A CA key and certificate that can sign leaves."""

    def __init__(self, common_name: str, now: dt.datetime) -> None:
        self.key = _key()
        self.name = _name(common_name)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        self.cert = (x509.CertificateBuilder()
                     .subject_name(self.name).issuer_name(self.name)
                     .public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(days=1))
                     .not_valid_after(now + dt.timedelta(days=3650))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                                  key_encipherment=False, data_encipherment=False,
                                                  key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(ski, critical=False)
                     .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                                    critical=False)
                     .sign(self.key, hashes.SHA256()))


def _leaf(names: tuple[str, ...], *, issuer: _Authority | None, not_before: dt.datetime,
          not_after: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A server certificate for `names`; issuer None = self-signed."""
    key = _key()
    subject = _name(names[0])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    signer_key = issuer.key if issuer else key
    aki = (x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()) if issuer
           else x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski))
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer.name if issuer else subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(_san(names), critical=False)
            .add_extension(ski, critical=False)
            .add_extension(aki, critical=False)
            .sign(signer_key, hashes.SHA256()))
    return cert, key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> CertPair:
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return CertPair(cert=_write_cert(directory / f"{stem}.crt", cert), key=key_path)


def make_pki(directory: Path) -> TestPKI:
    """Generate the CA and every test certificate into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    valid = {"not_before": now - dt.timedelta(hours=1), "not_after": now + dt.timedelta(days=30)}
    ca = _Authority("gatewise test CA", now)
    stranger = _Authority("gatewise untrusted CA", now)

    def pair(stem: str, names: tuple[str, ...], issuer: _Authority | None, **validity) -> CertPair:
        return _write_pair(directory, stem, *_leaf(names, issuer=issuer, **(validity or valid)))

    return TestPKI(
        ca=_write_cert(directory / "ca.crt", ca.cert),
        good=pair("good", LOCAL_NAMES, ca),
        expired=pair("expired", LOCAL_NAMES, ca, not_before=now - dt.timedelta(days=30),
                     not_after=now - dt.timedelta(days=1)),
        wrong_name=pair("wrong_name", ("other.example",), ca),
        self_signed=pair("self_signed", LOCAL_NAMES, None),
        other_ca_signed=pair("other_ca_signed", LOCAL_NAMES, stranger),
    )


def server_context(pair: CertPair, *, require_client_cert: bool = False, ca: Path | None = None,
                   minimum_version: ssl.TLSVersion | None = None,
                   maximum_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """A server-side context presenting `pair`. require_client_cert: clients must present a
    certificate signed by `ca` (TLS 1.3 then sends alert 116 certificate_required after
    the handshake to a client that has none). The version bounds pin the protocol range."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert, pair.key)
    if require_client_cert:
        if ca is None:
            raise ValueError("require_client_cert needs ca= (the CA that signs acceptable client certificates)")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=ca)
    elif ca is not None:
        ctx.load_verify_locations(cafile=ca)
    if minimum_version is not None:
        ctx.minimum_version = minimum_version
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    return ctx


def client_context(ca: Path | None = None, *, verify: bool = True) -> ssl.SSLContext:
    """A client-side context trusting `ca` (tests talking TLS to a FaultServer directly)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    return make_pki(tmp_path_factory.mktemp("pki"))
