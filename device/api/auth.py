"""Who may call the local API: a field-engineer token signed by the fleet, or the break-glass credential.

Field tokens (protocol/field_token.py) are checked against the fleet's token keys the device holds
(`field_trust()`), so they work while the device is offline. The break-glass credential is the
device's own secret (`secrets/api-token`, set at provisioning); it carries the technician role.

Roles: a viewer may call every GET (and HEAD); anything else needs a technician. A credential
that is presented and refused (wrong, expired, revoked, for another device) answers 401 and counts
as a failed login for the limiter; a viewer asking for a technician's route answers 403 and counts
nothing, since the caller proved who it is.

Verifying an Ed25519 signature costs tens of microseconds, about what the rest of a small infer
request costs the server; verified tokens are cached (bounded LRU keyed by the token string) until
their expiry or until `field_trust()` returns a different trust (new keys, new revocations).
"""

import hmac
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fastapi import HTTPException

from device.api.ratelimit import FailedLoginLimiter
from protocol.field_token import PREFIX, FieldToken, FieldTokenError, FieldTrust, verify

Role = Literal["viewer", "technician"]
VIEWER: Role = "viewer"
TECHNICIAN: Role = "technician"
_RANK = {VIEWER: 0, TECHNICIAN: 1}
_READ_METHODS = frozenset({"GET", "HEAD"})
BREAK_GLASS_SUBJECT = "break-glass"
SCHEME_DESCRIPTION = (
    "Either a field-engineer token signed by the fleet (`eft1.…`: role `viewer` may call every GET, "
    "`technician` everything; at most 8 h; checked offline with the fleet's public key) or the "
    "device's break-glass credential (`secrets/api-token`, set at provisioning; technician)."
)
TrustSource = Callable[[], FieldTrust | None]
# The words clients and tests have known since before field tokens; a field token gets its reason.
WRONG_CREDENTIAL = "missing or wrong bearer token"


def role_for(method: str) -> Role:
    """The least role a request of `method` needs: reading is for viewers, changing for technicians."""
    return VIEWER if method.upper() in _READ_METHODS else TECHNICIAN


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the break-glass holder, or the engineer a field token names."""

    subject: str
    role: Role
    token: FieldToken | None = None  # None for the break-glass credential


_BREAK_GLASS_HOLDER = Principal(BREAK_GLASS_SUBJECT, TECHNICIAN)  # made once: this is the hot path


def _unauthorized(reason: str) -> HTTPException:
    return HTTPException(401, reason, headers={"WWW-Authenticate": "Bearer"})


class Authenticator:
    """Turns a request's bearer credential into a Principal, or raises the HTTP error to answer.

    `field_trust` is None where the device takes no field tokens at all (a bench `device serve`);
    when it returns None the device has no fleet keys yet. It should return the same object until
    the trust changes: a new object costs one comparison per request, and a different trust empties
    the cache, so a revocation holds from the next request on.
    """

    def __init__(
        self,
        break_glass: str,
        limiter: FailedLoginLimiter | None = None,
        field_trust: TrustSource | None = None,
        device_id: str | None = None,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not break_glass:
            raise ValueError("the break-glass credential is empty: provision the device again")
        if field_trust is not None and not device_id:
            raise ValueError("field_trust needs the device_id the tokens must name")
        self._break_glass = break_glass.encode()
        self.limiter = limiter or FailedLoginLimiter()
        self._field_trust = field_trust
        self._device_id = device_id or ""
        self._cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Principal, int]] = OrderedDict()  # token -> (who, exp)
        self._trust: FieldTrust | None = None  # the trust the cache was filled under
        self._lock = threading.Lock()  # sync routes' dependencies may run on worker threads

    def authorize(self, client: str, credentials: str | None, needed: Role) -> Principal:
        """The caller, if it may do what needs `needed`; else 429, 401 or 403 as HTTPException."""
        wait = self.limiter.blocked_for(client)
        if wait > 0:
            raise HTTPException(
                429,
                f"too many failed logins; retry in {wait:.0f} s",
                headers={"Retry-After": str(int(wait) + 1)},
            )
        if credentials is None:  # not a guess: not counted
            raise _unauthorized(WRONG_CREDENTIAL)
        try:
            principal = self._authenticate(credentials)
        except HTTPException:
            self.limiter.failed(client)
            raise
        if _RANK[principal.role] < _RANK[needed]:
            raise HTTPException(
                403, f"this needs the {needed} role; the token of {principal.subject!r} is {principal.role}"
            )
        return principal

    def _authenticate(self, credentials: str) -> Principal:
        # Constant time against the break-glass secret whatever was sent, so timing tells nothing.
        if hmac.compare_digest(credentials.encode("utf-8", "surrogatepass"), self._break_glass):
            return _BREAK_GLASS_HOLDER
        if not credentials.startswith(PREFIX + "."):
            raise _unauthorized(WRONG_CREDENTIAL)  # says no more: it may be a guess at the secret
        if self._field_trust is None:
            raise _unauthorized("this API takes no field tokens: use the break-glass credential")
        trust = self._field_trust()
        if trust is None:
            raise _unauthorized(
                "field tokens are refused: this device has no fleet token keys yet (it gets them from "
                "the fleet once connected); use the break-glass credential"
            )
        now = self._clock()
        with self._lock:
            if trust is not self._trust:
                if trust != self._trust:
                    self._cache.clear()
                self._trust = trust
            hit = self._cache.get(credentials)
            if hit is not None:
                if now < hit[1]:
                    self._cache.move_to_end(credentials)
                    return hit[0]
                del self._cache[credentials]  # expired: verify says so below, with the reason
        try:
            token = verify(credentials, trust, self._device_id, now)
        except FieldTokenError as e:
            raise _unauthorized(f"field token refused: {e.reason}") from e
        principal = Principal(token.sub, VIEWER if token.role == VIEWER else TECHNICIAN, token)
        with self._lock:
            if trust is self._trust:  # else the trust changed meanwhile: this result is stale
                self._cache[credentials] = (principal, token.exp)
                self._cache.move_to_end(credentials)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return principal
