"""The tfgrid ledger: a Tendermint BFT chain holding accounts, twins, farms, nodes and contracts."""
