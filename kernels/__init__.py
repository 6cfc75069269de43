# OpenCL C sources, shipped as package data (see pyproject.toml).
