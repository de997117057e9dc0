"""Planning a job before it runs (`python -m xpar.plan`): memory per GPU, step time and MFU,
and the measurements that check them."""
