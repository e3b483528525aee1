"""TrainingBoxHook: the training box over SSH, the SSH provider's ``SSHHook`` with lora-deploy's defaults.

One SSH connection means the same thing in our tasks as in a user's ``SSHOperator``: the connection and its
extras (``key_file``, ``private_key`` and ``private_key_passphrase``, ``host_key``, ``look_for_keys``,
``conn_timeout``, ``ciphers``, ``disabled_algorithms``, a ``ProxyCommand`` in ``~/.ssh/config``) are read by
``SSHHook`` itself. What differs is on purpose and listed in :class:`TrainingBoxHook`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowException
from airflow.providers.ssh.hooks.ssh import SSHHook

from include.errors import ConfigError, SourceError
from include.source.endpoint import SSHEndpoint, ssh_errors, tcp_nodelay
from include.source.ssh import SSHSource
from operators.hooks.base import ConnectionLookup
from operators.hooks.vastai import VastAIHook

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 30
DEFAULT_USER = "root"  # the login of Vast.ai instances (and of most training boxes)
KNOWN_HOSTS = "~/.ssh/known_hosts"
# Extras with which SSHHook would skip the host key check; here only the model's config may do that.
CHECK_OFF_EXTRAS = ("no_host_key_check", "ignore_hostkey_verification", "allow_host_key_change")


def _true(value: Any) -> bool:
    return str(value).strip().lower() == "true"


class TrainingBoxHook(ConnectionLookup, SSHHook):
    """SSH to the box that holds the checkpoints; :meth:`open_source` gives the engine's ``SSHSource`` on it.

    It is ``SSHHook`` with these differences:

    * host keys are always checked (the pinned ``host_key``, else ``~/.ssh/known_hosts``) unless the model's
      config says ``verify_host_key: false``; the extras ``no_host_key_check`` or ``allow_host_key_change``
      alone do not turn the check off (a warning says so);
    * no compression unless the extra says ``"compress": true`` (SSHHook compresses by default, which costs
      2-3x throughput on a fast link), and TCP_NODELAY on the socket (pipelined SFTP reads stall without it);
    * the login defaults to ``root`` (a Vast.ai instance's user) rather than the local user;
    * one connection attempt within 30 s (the task's retries wait for a box that is not up yet), and failures
      are engine errors naming the box and the fix (:func:`include.source.endpoint.ssh_errors`).

    For a Vast.ai source, pass ``instance_id`` (and the :class:`VastAIHook`): the instance must be running and
    its SSH host and port replace the connection's; the connection then only brings login and keys.

    :param ssh_conn_id: the SSH connection (``source.ssh_conn_id``); None with ``instance_id`` alone.
    :param remote_host: a host that wins over the connection's.
    :param port: a port that wins over the connection's.
    :param verify_host_key: ``source.verify_host_key``; False skips the host key check (explicit opt-out).
    :param vastai: the Vast.ai API to ask for the instance's endpoint.
    :param instance_id: the Vast.ai instance to reach.
    :param conn_retry_attempts: connection attempts within one task try.
    """

    hook_name = "Training box (SSH)"

    def __init__(self, ssh_conn_id: str | None = None, *, remote_host: str = "", port: int | None = None,
                 verify_host_key: bool = True, vastai: VastAIHook | None = None, instance_id: str | None = None,
                 conn_retry_attempts: int = 1) -> None:
        self.verify_host_key = verify_host_key
        self.where = ssh_conn_id or ""
        if instance_id:
            instance = (vastai or VastAIHook()).running_instance(instance_id)
            remote_host, port = instance.ssh_host, instance.ssh_port
            self.where = f"vast.ai instance {instance.id}"
        conn = self.find_connection(ssh_conn_id) if ssh_conn_id else None
        if ssh_conn_id and conn is None:
            raise ConfigError(f"SSH connection {ssh_conn_id!r} does not exist",
                              fix=f"create it in Admin > Connections or as AIRFLOW_CONN_{ssh_conn_id.upper()}")
        if not remote_host and not (conn is not None and conn.host):
            raise SourceError(f"connection {ssh_conn_id!r} has no host", fix="set the host of the SSH connection")
        extras = conn.extra_dejson if conn is not None else {}
        try:
            super().__init__(ssh_conn_id=ssh_conn_id, remote_host=remote_host, port=port,
                             username=None if conn is not None and conn.login else DEFAULT_USER,
                             conn_retry_attempts=conn_retry_attempts,
                             no_host_key_check=False)  # decided below, from verify_host_key alone
        except (AirflowException, ValueError) as err:  # SSHHook's own checks of the extras (no secret in them)
            raise SourceError(f"SSH connection {ssh_conn_id!r} cannot be used: {err}",
                              fix="correct the connection's extras (host_key is 'keytype base64-data' as "
                                  "`ssh-keyscan` prints it, without the host name; key_file or private_key, not "
                                  "both)") from err
        self._private_key = extras.get("private_key") if self.pkey is not None else None
        self._key_passphrase = bool(extras.get("private_key_passphrase"))
        self.compress = _true(extras.get("compress"))
        self.conn_timeout = self.conn_timeout or CONNECT_TIMEOUT_S
        if self.key_file:
            self.key_file = os.path.expanduser(self.key_file)
        asked_off = [name for name in CHECK_OFF_EXTRAS if _true(extras.get(name))]
        if verify_host_key:
            if asked_off:
                log.warning("connection %r says %s, but host keys are still checked: set verify_host_key: false in "
                            "the model's source config to skip the check", ssh_conn_id, " and ".join(asked_off))
            self.no_host_key_check = False
            self.allow_host_key_change = False
        else:
            log.warning("host key checking is OFF for %s (verify_host_key: false in the config)", self.description)
            self.no_host_key_check = True
            self.allow_host_key_change = True  # known_hosts is not even read: a re-created box is accepted

    @property
    def description(self) -> str:
        """``user@host:port`` for messages."""
        return f"{self.username}@{self.remote_host}:{self.port}"

    def get_conn(self) -> paramiko.SSHClient:
        """The connected client (SSHHook's), TCP_NODELAY set; SourceError / TransientSourceError on failure."""
        with ssh_errors(self.description, KNOWN_HOSTS):
            client = super().get_conn()
        tcp_nodelay(client)
        return client

    def rsync_endpoint(self) -> SSHEndpoint | None:
        """How ``ssh`` (rsync's transport) reaches the same box with the same key and host key check.

        None when only paramiko can log in (a password, or a key with a passphrase): the transfer then uses SFTP.
        """
        if self._key_passphrase or (self.password and not (self.key_file or self._private_key)):
            return None
        host_key = f"{self.host_key.get_name()} {self.host_key.get_base64()}" if self.host_key is not None else None
        return SSHEndpoint(host=self.remote_host, port=int(self.port or 22), user=str(self.username),
                           key_file=self.key_file, private_key=self._private_key, host_key=host_key,
                           verify_host_key=not self.no_host_key_check, connect_timeout_s=float(self.conn_timeout))

    @contextmanager
    def open_source(self, remote_dir: str, checkpoint_glob: str, transfer: str) -> Iterator[SSHSource]:
        """The engine's source on the box (listing, hashing, rsync/SFTP); the SSH session closes on exit."""
        client = self.get_conn()
        try:
            remote = SSHSource(client, remote_dir, checkpoint_glob, description=f"{self.where}:{remote_dir}",
                               endpoint=self.rsync_endpoint(), method=transfer)  # type: ignore[arg-type]
            try:
                yield remote
            finally:
                remote.close()
        finally:
            client.close()
            self.client = None
