"""A plain Mosquitto as a plant's PLC gateway runs it, for the line-state tests."""

import os
import pwd
from pathlib import Path

from edgefleet.procs import free_port
from fleet.broker import BrokerTls, ManagedBroker


class PlantBroker(ManagedBroker):
    """A plain Mosquitto as a PLC gateway runs it: no fleet ACL; anonymous, or one password user;
    optionally TLS with a server certificate only. Retained messages persist across restarts."""

    def __init__(self, folder: Path, password_file: Path | None = None, tls: BrokerTls | None = None) -> None:
        super().__init__(
            folder, "127.0.0.1", free_port(), password_file or folder / "none", folder / "none", tls
        )
        self.password_file_or_none = password_file

    def write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        auth = (
            f"allow_anonymous false\npassword_file {self.password_file_or_none}\n"
            if self.password_file_or_none
            else "allow_anonymous true\n"
        )
        if self.tls is not None:
            auth += f"cafile {self.tls.cafile}\ncertfile {self.tls.certfile}\nkeyfile {self.tls.keyfile}\n"
        self.config_path.write_text(
            f"listener {self.port} {self.host}\n{auth}"
            f"persistence true\npersistence_location {self.folder}/\n"
            f"log_dest file {self.log_path}\n"
            # As the fleet's broker: started as root it would drop to `mosquitto` and not write here.
            f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
        )
