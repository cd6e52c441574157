#!/bin/sh
# Prints the greeting from the configuration (for images that add a shell).
. "${HELLO_CONF:-/etc/hello/hello.conf}" 2>/dev/null
echo "${greeting:-hello} from $(cat /etc/motd)"
