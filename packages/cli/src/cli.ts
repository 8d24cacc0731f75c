#!/usr/bin/env node
console.log('blkfilter: not yet');
