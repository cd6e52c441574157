#!/bin/sh
cat /srv/greeting
cat /etc/kiln/base.conf
