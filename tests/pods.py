# SPDX-License-Identifier: MIT
"""Pods on one node, as the tests build them: two network namespaces joined by a veth pair."""

import os
import subprocess

from netbpf import netns


class Pods:
    """Two network namespaces joined by a veth pair, 10.231.0.1 in one, 10.231.0.2 in the other;
    removed afterwards."""

    def __init__(self):
        tag = f"nb{os.getpid() % 100000}"
        self.names = (f"{tag}a", f"{tag}b")
        self.addresses = ("10.231.0.1", "10.231.0.2")

    def __enter__(self):
        try:
            for name in self.names:
                ip("netns", "add", name)
            ip("link", "add", f"{self.names[0]}v", "type", "veth", "peer", "name", f"{self.names[1]}v")
            for name, address in zip(self.names, self.addresses):
                ip("link", "set", f"{name}v", "netns", name)
                ip("-n", name, "addr", "add", f"{address}/24", "dev", f"{name}v")
                ip("-n", name, "link", "set", f"{name}v", "up")
                ip("-n", name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    def enter(self, index):
        """This process (a forked child, one thread) into namespace `index`."""
        netns.enter(self.path(index))

    def path(self, index):
        return f"/run/netns/{self.names[index]}"

    def inode(self, index):
        """Namespace `index` as the bypass names it (the inode number of its file)."""
        return os.stat(self.path(index)).st_ino


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)
