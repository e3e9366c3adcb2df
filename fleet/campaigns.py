"""Runs rollout campaigns for the fleet: the tick that offers what is due, and the operator's actions.

The planner (`fleet/rollouts.py`) is pure bookkeeping over the database; this is where it meets the
service's offers. One lock serialises the tick and every operator action, so an offer planned
just before an abort is never sent after it, and withdrawn offers are never re-sent. The database
work runs in threads: the event loop it would block also answers the devices' chunk requests.
"""

import asyncio
import logging
from typing import Any, Literal

from fleet import maintenance, rollouts
from fleet.rollout_db import labels_of, set_labels
from fleet.rollouts import Phase, Target
from fleet.service import FleetService

log = logging.getLogger(__name__)
Action = Literal["pause", "resume", "abort", "rollback"]
TICK_S = 2.0


class CampaignDriver:
    def __init__(self, service: FleetService) -> None:
        self.service = service
        self._lock = asyncio.Lock()

    async def run(self, every_s: float = TICK_S) -> None:
        """Drive every active campaign forever; a failing tick is logged and tried again."""
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("campaign tick failed; next try in %.0f s", every_s)
            await asyncio.sleep(every_s)

    async def tick(self) -> list[str]:
        """Offer what is due in each active campaign; the new update (or rollback) ids."""
        created: list[str] = []
        async with self._lock:
            for campaign_id in await asyncio.to_thread(self._active):
                created += await rollouts.offer_next(
                    self.service.sessions,
                    campaign_id,
                    self.service.start_update,
                    self.service.request_rollback,
                    self.service.clock(),
                )
        return created

    def _active(self) -> list[str]:
        with self.service.sessions() as s:
            return rollouts.active_campaigns(s)

    async def start(
        self,
        model_name: str,
        version: int,
        target: Target,
        phases: list[Phase] | None = None,
        seed: str | None = None,
    ) -> dict[str, Any]:
        async with self._lock:
            campaign_id = await asyncio.to_thread(
                self._create, model_name, version, target, phases, seed, self.service.clock()
            )
        await self.tick()  # the first phase goes out now, not at the next tick
        return await asyncio.to_thread(self.status, campaign_id)

    def _create(
        self,
        model_name: str,
        version: int,
        target: Target,
        phases: list[Phase] | None,
        seed: str | None,
        now: float,
    ) -> str:
        with self.service.sessions.begin() as s:
            return rollouts.create_campaign(s, model_name, version, target, phases, seed=seed, now=now)

    async def act(self, campaign_id: str, action: Action, reason: str = "") -> dict[str, Any]:
        async with self._lock:
            await asyncio.to_thread(self._act, campaign_id, action, reason, self.service.clock())
        if action == "rollback":
            await self.tick()
        return await asyncio.to_thread(self.status, campaign_id)

    def _act(self, campaign_id: str, action: Action, reason: str, now: float) -> None:
        with self.service.sessions.begin() as s:
            if action == "pause":
                rollouts.pause(s, campaign_id, now)
            elif action == "resume":
                rollouts.resume(s, campaign_id, now)
            elif action == "abort":
                rollouts.abort(s, campaign_id, reason or "aborted by the operator", now)
            else:
                rollouts.rollback(s, campaign_id, now)
            withdraw = rollouts.unstarted_offers(s, campaign_id) if action in ("abort", "rollback") else []
        if withdraw:
            self.service.cancel_pending(withdraw, f"campaign {campaign_id}: {action}")

    def status(self, campaign_id: str) -> dict[str, Any]:
        with self.service.sessions() as s:
            return rollouts.status(s, campaign_id)

    def all(self) -> list[dict[str, Any]]:
        with self.service.sessions() as s:
            return rollouts.list_campaigns(s)

    # -- labels and maintenance windows ------------------------------------------------------------
    def set_labels(self, device_id: str, groups: list[str], tags: list[str]) -> dict[str, list[str]]:
        self.service.get_device(device_id)  # 404 for an unknown device
        with self.service.sessions.begin() as s:
            set_labels(s, device_id, groups, tags)
        with self.service.sessions() as s:
            return labels_of(s, device_id)

    def add_window(self, group: str, cron: str, duration_minutes: int, tz: str) -> list[dict[str, object]]:
        with self.service.sessions.begin() as s:
            maintenance.add_window(s, group, cron, duration_minutes, tz)
        return self.windows()

    def remove_window(self, window_id: int) -> None:
        with self.service.sessions.begin() as s:
            maintenance.remove_window(s, window_id)

    def windows(self) -> list[dict[str, object]]:
        with self.service.sessions() as s:
            return maintenance.list_windows(s)
